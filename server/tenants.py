"""Who is asking, as the layers below HTTP see it: a tenant and whether it acts for every tenant (API.md, Auth).

Adapters, training files and jobs record the tenant that created them (`owner`). A tenant sees its own and the
published ones (`public`); an admin sees and manages all. Objects with no owner are the operator's (adapters from
`--adapter-dir`, stores written before owners were recorded, anything made while no API keys are configured):
only an admin manages them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tenant:
    id: str | None
    """The tenant's name (None: the operator, as when no API keys are configured)."""
    admin: bool = False
    """Acts on every tenant's objects."""

    def owns(self, owner: str | None) -> bool:
        """Whether this tenant may manage (replace, delete, publish, download) an object `owner` created."""
        return self.admin or (self.id is not None and owner == self.id)

    def sees(self, owner: str | None, public: bool) -> bool:
        """Whether this tenant may see and use an object of `owner`, published or not."""
        return public or self.owns(owner)


OPERATOR = Tenant(None, admin=True)  # no API keys configured: everything is allowed

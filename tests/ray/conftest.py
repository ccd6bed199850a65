"""Ray tests: the authentication mode Ray must read when it is first imported."""

from __future__ import annotations

import os

# loraplex serve --replicas starts Ray instances with token authentication (Ray's default for local instances); this
# process joins one as a driver, and Ray reads the mode once, when it is first imported: before any module here does.
os.environ.setdefault("RAY_AUTH_MODE", "token")

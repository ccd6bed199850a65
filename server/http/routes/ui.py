"""The web console: `/ui/` (static files shipped in the package, `server/http/ui/`) and its two small routes.

The console speaks the public API (API.md) from the browser; it needs only what that API does not say:
`/ui/api/session` (what the caller's key may do, the server's training defaults and limits) and
`/ui/api/adapters` (where each adapter lives now: device pool, host memory or disk, and which one is merged).
Both read state the server already keeps; nothing is computed in the engine for the page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

from adapters.training.config import Hyperparameters
from server.http.auth import SCOPES, AuthRoute, Caller, authenticate, require
from server.http.protocol import JobHyperparameters
from server.http.state import Ready

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
# the console's scripts come from this server only; styles may be set inline (the chart library sizes its canvas)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
# what the console offers → the scope its routes require (in step with the routes' `require(...)`;
# tests/ui/test_console_auth.py checks each against the server's answers)
ACTIONS = {"generate": "inference", "download_adapters": "train", "manage_adapters": "train", "train": "train"}

router = APIRouter(include_in_schema=False)
api = APIRouter(include_in_schema=False, route_class=AuthRoute)  # the console's data: the key checked as the API's


def install(app: FastAPI) -> None:
    """Serve the console: its routes, and its static files under /ui/static/."""
    app.include_router(router)
    app.include_router(api)
    app.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui-static")


@router.get("/ui")
def to_console() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=308)  # relative: the page's own relative links work behind a prefix


@router.get("/ui/")
def console() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@router.get("/ui/api/session")
def session(st: Ready, request: Request) -> dict:
    """What the console needs to draw itself for this key (401 for a missing or wrong one): the base model, what
    the key may do, the training hyperparameters (JSON schema: defaults, bounds, descriptions) and the server's
    limits. Any valid key may ask, whatever its scopes."""
    key = authenticate(st.api_keys, request)
    scopes = {scope for scope in SCOPES if key.allows(scope)}
    s, catalog = st.settings, st.catalog
    return {
        "model": st.base.model_id,
        "max_model_len": st.serving.max_model_len,
        "auth": st.api_keys is not None,
        "scopes": sorted(scopes),
        "can": {action: scope in scopes for action, scope in ACTIONS.items()},
        "limits": {
            "max_lora_rank": catalog.max_rank, "max_train_steps": s.max_train_steps,
            "max_job_seconds": s.max_job_seconds, "max_training_file_bytes": s.max_training_file_bytes,
            "max_training_examples": s.max_training_examples, "max_upload_bytes": s.max_upload_bytes,
        },  # fmt: skip
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in catalog.layer_shapes}),
        "methods": ["lora", "switchlora"],
        "hyperparameters": hyperparameter_schema(),
    }


def hyperparameter_schema() -> dict:
    """The JSON schema of a job's `method.hyperparameters`, each field with the trainer's one-line description
    (the fields the job API widens with "auto" would otherwise lose theirs)."""
    schema = JobHyperparameters.model_json_schema()
    described = Hyperparameters.model_json_schema()["properties"]
    for name, prop in schema["properties"].items():
        if "description" not in prop and "description" in described.get(name, {}):
            prop["description"] = described[name]["description"]
    return schema


@api.get("/ui/api/adapters", dependencies=[require("inference", "train")])
def adapter_residence(st: Ready, key: Caller) -> dict:
    """Where each adapter the key's tenant sees has its weights now ("device": in the LoRA pool, "host": in
    memory, "disk": on disk only), and the adapter merged into the base weights, if the tenant sees it. Behind a
    Ray Serve ingress each replica holds its own: every adapter is "disk" (in the shared store) there."""
    pool, merger = st.engine.pool, st.engine.merger
    on_device = pool.resident_keys() if pool is not None else frozenset()
    merged = merger.merged if merger is not None else None
    tiers = {a.name: "device" if a.key in on_device else "host" if a.weights is not None else "disk"
             for a in st.catalog.list(key.as_tenant)}  # fmt: skip
    return {"merged": merged.name if merged is not None and merged.name in tiers else None, "adapters": tiers}

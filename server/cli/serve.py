"""Serve the OpenAI-compatible API (every setting is an option, and an environment variable LORAPLEX_<NAME>)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from server.cli.options import build, given, options_of, with_options
from server.settings import Settings


def serve(
    log_level: Annotated[str, typer.Option(help="Logging level: debug, info, warning or error.")] = "info", **options
) -> None:
    import uvicorn

    from server.http.app import create_app
    from server.http.drain import GRACE, DrainingServer

    settings = build(Settings, **given(options, Settings))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # SIGTERM drains first (server.http.drain); uvicorn's own graceful shutdown then has nothing left to wait for
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=int(GRACE))  # fmt: skip
    DrainingServer(config, app.state.loraplex, settings.drain_timeout).run()


with_options(serve, options_of(Settings, env_prefix=Settings.model_config["env_prefix"]))

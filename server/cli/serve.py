"""Serve the OpenAI-compatible API (every setting is an option, and an environment variable LORAPLEX_<NAME>); with
--replicas N, N engine replicas behind one endpoint on Ray Serve."""

from __future__ import annotations

import typer

from server.cli.options import build, given, options_of, with_options
from server.logs import configure_logging
from server.settings import Settings


def serve(**options) -> None:
    settings = build(Settings, **given(options, Settings))
    log_config = configure_logging(settings.log_level, settings.log_format)
    if settings.clustered:  # through Ray Serve: only this path imports ray
        try:
            from server.ray.app import run
        except ImportError as e:
            if (e.name or "").split(".")[0] not in ("ray", "fsspec"):
                raise
            typer.secho(f"error: --replicas needs Ray Serve ({e.name} is missing): pip install 'loraplex[ray]'",
                        fg="red", err=True)  # fmt: skip
            raise typer.Exit(2) from None
        run(settings)
        return
    import uvicorn

    from server.http.app import create_app
    from server.http.drain import GRACE, DrainingServer

    app = create_app(settings)
    # SIGTERM drains first (server.http.drain); uvicorn's own graceful shutdown then has nothing left to wait for
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=log_config, timeout_graceful_shutdown=int(GRACE))  # fmt: skip
    state = app.state.loraplex
    server = DrainingServer(config, state, settings.drain_timeout)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.load_error:  # start-up failed: said in one log line; the process says so with its exit status
        raise typer.Exit(1)


with_options(serve, options_of(Settings, env_prefix=Settings.model_config["env_prefix"]))

"""The `loraplex` command: `loraplex serve` (also `python -m server`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="loraplex: many LoRA adapters, one base model.")


@app.callback()
def main() -> None:
    """loraplex command line."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [LORAPLEX_HOST, 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [LORAPLEX_PORT, 8000].")] = None,
    model: Annotated[str | None, typer.Option(help="HF model directory or hub id [default: embedded SmolLM2-135M-Instruct].")] = None,
    adapter_dir: Annotated[Path | None, typer.Option(help="Load every PEFT adapter subdirectory at start.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Uploaded adapters, files, jobs [./.loraplex].")] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="API keys file (KEY [scope,...] per line).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length cap.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Sequences per decode batch.")] = None,
    lora_backend: Annotated[str | None, typer.Option(help="compiled or eager.")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API."""
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    overrides = {k: v for k, v in locals().items() if v is not None and k not in ("log_level", "uvicorn", "create_app", "Settings")}
    settings = Settings(**overrides)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout),
    )


if __name__ == "__main__":
    app()

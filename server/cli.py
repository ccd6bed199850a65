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


adapters_app = typer.Typer(no_args_is_help=True, help="Manage the adapters of a running server.")
app.add_typer(adapters_app, name="adapters")

Url = Annotated[str, typer.Option("--url", envvar="LORAPLEX_URL", help="Server address.")]
Key = Annotated[str | None, typer.Option("--api-key", envvar="LORAPLEX_API_KEY", help="API key (admin scope to write).")]


def _client(url: str, api_key: str | None):
    from client import LoraplexClient

    return LoraplexClient(url, api_key=api_key)


def _run(fn):
    """Call the server; print its error message (not a traceback) and exit 1 on failure."""
    import httpx

    from client import LoraplexError

    try:
        return fn()
    except LoraplexError as e:
        typer.secho(f"error: {e.message}", fg="red", err=True)
        raise typer.Exit(1) from None
    except httpx.HTTPError as e:
        typer.secho(f"error: cannot reach the server ({e.__class__.__name__}: {e})", fg="red", err=True)
        raise typer.Exit(1) from None


def _print_adapters(adapters) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "version", "rank", "alpha", "target modules", "size", "sha256")
    for a in adapters:
        table.add_row(a.id, str(a.version), str(a.rank), str(a.alpha), ",".join(a.target_modules),
                      f"{a.size_bytes / 2**20:.1f} MiB", (a.sha256 or "")[:12])
    Console().print(table)


@adapters_app.command("upload")
def adapters_upload(
    name: str,
    path: Annotated[Path, typer.Argument(help="A PEFT adapter directory, or a .zip / .tar.gz of one.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter of that name.")] = False,
    url: Url = "http://127.0.0.1:8000",
    api_key: Key = None,
) -> None:
    """Upload an adapter; it is servable when this returns."""
    with _client(url, api_key) as c:
        kw = {"directory": path} if path.is_dir() else {"archive": path}
        _print_adapters([_run(lambda: c.upload_adapter(name, overwrite=overwrite, **kw))])


@adapters_app.command("list")
def adapters_list(url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """List the adapters."""
    with _client(url, api_key) as c:
        _print_adapters(_run(c.list_adapters))


@adapters_app.command("show")
def adapters_show(name: str, url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """Show one adapter as JSON."""
    with _client(url, api_key) as c:
        typer.echo(_run(lambda: c.get_adapter(name)).model_dump_json(indent=2))


@adapters_app.command("delete")
def adapters_delete(name: str, url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """Delete an adapter (requests already running finish first)."""
    with _client(url, api_key) as c:
        _run(lambda: c.delete_adapter(name))
        typer.echo(f"deleted {name}")


@adapters_app.command("download")
def adapters_download(name: str, dest: Annotated[Path, typer.Argument(help="File or directory.")] = Path("."),
                      url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """Download an adapter's PEFT files as .tar.gz."""
    with _client(url, api_key) as c:
        typer.echo(str(_run(lambda: c.download_adapter(name, dest))))


if __name__ == "__main__":
    app()

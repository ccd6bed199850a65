"""The commands that talk to a running server: `loraplex adapters ...` and `loraplex jobs ...` (through `client`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

adapters_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage the adapters of a running server.")

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


# --- training ------------------------------------------------------------------------------


jobs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Training jobs of a running server.")


def _print_jobs(jobs) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "status", "adapter", "step", "loss", "trained tokens", "error")
    for j in jobs:
        m = j.metrics or {}
        loss = m.get("train_loss")
        error = j.error.message if hasattr(j.error, "message") else (j.error or "")
        table.add_row(j.id, j.status, j.adapter_name, f"{m.get('step', 0)}/{m.get('total_steps', '?')}",
                      "" if loss is None else f"{loss:.4f}", str(j.trained_tokens or 0), error)
    Console().print(table)


@jobs_app.command("create")
def jobs_create(
    train_file: Annotated[Path, typer.Argument(help="JSONL training file (uploaded first).")],
    adapter_name: Annotated[str, typer.Option("--adapter-name", "-n", help="Name to serve the adapter under.")],
    validation_file: Annotated[Path | None, typer.Option(help="JSONL validation file.")] = None,
    method: Annotated[str, typer.Option(help="lora or switchlora.")] = "lora",
    hyperparameter: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE hyperparameter (JSON value), repeatable.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job with a progress bar.")] = False,
    url: Url = "http://127.0.0.1:8000",
    api_key: Key = None,
) -> None:
    """Upload the file(s) and start a job."""
    import json

    hp = {}
    for item in hyperparameter or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        try:
            hp[key] = json.loads(value)
        except json.JSONDecodeError:
            hp[key] = value
    with _client(url, api_key) as c:
        train_id = _run(lambda: c.upload_file(train_file)).id
        val_id = _run(lambda: c.upload_file(validation_file)).id if validation_file else None
        job = _run(lambda: c.create_job(train_id, adapter_name, {"type": method, "hyperparameters": hp}, val_id, seed))
        typer.echo(job.id)
        if wait:
            _follow_job(c, job.id)


def _follow_job(c, job_id: str) -> None:
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[status]}")) as progress:
        task = progress.add_task(job_id, total=None, status="queued")

        def follow() -> None:
            for e in c.stream_job_events(job_id):
                d = e.data or {}
                if "loss" in d:
                    progress.update(task, completed=d["step"], total=d["total_steps"], status=f"loss {d['loss']:.4f}")
                else:
                    progress.console.print(e.message)

        _run(follow)
    job = _run(lambda: c.get_job(job_id))
    if job.status != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """List the jobs."""
    with _client(url, api_key) as c:
        _print_jobs(_run(c.list_jobs))


@jobs_app.command("show")
def jobs_show(job_id: str, url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """Show one job as JSON."""
    with _client(url, api_key) as c:
        typer.echo(_run(lambda: c.get_job(job_id)).model_dump_json(indent=2))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """Cancel a queued or running job."""
    with _client(url, api_key) as c:
        _print_jobs([_run(lambda: c.cancel_job(job_id))])


@jobs_app.command("events")
def jobs_events(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until the job ends.")] = False,
                url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """Print a job's events (loss curve included)."""
    with _client(url, api_key) as c:

        def show() -> None:
            for e in c.stream_job_events(job_id) if follow else c.job_events(job_id):
                typer.echo(e.message)

        _run(show)

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
    lora_dtype: Annotated[
        str | None, typer.Option(help="LoRA pool dtype: auto (the model's), float32, bfloat16 or float16.")
    ] = None,
    pack_weights: Annotated[
        bool | None, typer.Option(help="fp32 CPU: a oneDNN-packed copy of the weights (faster, twice the memory).")
    ] = None,
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


# --- training ------------------------------------------------------------------------------


@app.command()
def train(
    train_file: Annotated[Path, typer.Argument(help="JSONL: {prompt, completion} or {messages} per line.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the PEFT adapter to.")],
    model: Annotated[str | None, typer.Option(help="HF model directory or hub id [default: embedded SmolLM2-135M-Instruct].")] = None,
    validation_file: Annotated[Path | None, typer.Option(help="JSONL evaluated during training.")] = None,
    method: Annotated[str, typer.Option(help="lora or switchlora.")] = "lora",
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha [2 * rank].")] = None,
    target_modules: Annotated[str | None, typer.Option(help="Comma-separated module names [all linear layers].")] = None,
    n_epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 3,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --n-epochs).")] = None,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per example at most.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same adapter.")] = 0,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Checkpoint here; a rerun resumes from it.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where the default model's converted copy is cached.")] = Path(".loraplex"),
) -> None:
    """Train an adapter offline (no server), with a progress bar."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from adapters.data import DataError
    from adapters.trainer import TrainConfig
    from adapters.trainer import train as run_training
    from server.model import DEFAULT_MODEL_ID, prepare_default_model

    if threads:
        torch.set_num_threads(threads)
    if model is None or model == DEFAULT_MODEL_ID:
        model = str(prepare_default_model(data_dir / "cache"))
    cfg = TrainConfig(
        model=model, train_file=train_file, out_dir=out, validation_file=validation_file, method=method, rank=rank,
        alpha=alpha or 2.0 * rank, target_modules=target_modules.split(",") if target_modules else None,
        n_epochs=n_epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
        max_length=max_length, seed=seed, checkpoint_dir=checkpoint_dir,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("training", total=None, status="loading")

        def on_event(e: dict) -> None:
            if e["type"] == "step":
                progress.update(task, completed=e["step"], total=e["total_steps"],
                                status=f"loss {e['loss']:.4f}  {e['tokens_per_second']:.0f} tok/s")
            elif e["type"] == "eval":
                progress.console.print(f"step {e['step']}: validation loss {e['eval_loss']:.4f}")
            elif e["type"] == "info":
                progress.console.print(e["message"])

        try:
            result = run_training(cfg, on_event=on_event)
        except DataError as e:
            typer.secho("invalid training data:\n  " + "\n  ".join(e.problems), fg="red", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"{result.status}: {result.steps} steps, {result.trained_tokens} trained tokens, "
               f"loss {result.train_loss:.4f}; adapter written to {result.out_dir}")


jobs_app = typer.Typer(no_args_is_help=True, help="Training jobs of a running server.")
app.add_typer(jobs_app, name="jobs")


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


if __name__ == "__main__":
    app()

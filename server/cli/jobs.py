"""`loraplex jobs ...`: training jobs of a running server (through `client`). `create` uploads the files and starts
the job (a refused job leaves no uploaded file behind); `--wait` follows it with its step, loss, elapsed time and
ETA, then a summary."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from server.cli.remote import DEFAULT_URL, Json, Key, Url, call, client, fail, list_and_show, print_json, run

jobs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Training jobs of a running server.")


def _loss(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def print_jobs(jobs, as_json: bool = False) -> None:
    if as_json:
        return print_json(jobs)
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "status", "adapter", "step", "loss", "trained tokens", "error")
    for j in jobs:
        m = j.metrics or {}
        error = j.error.message if hasattr(j.error, "message") else (j.error or "")
        table.add_row(j.id, j.status, j.adapter_name, f"{m.get('step', 0)}/{m.get('total_steps', '?')}",
                      _loss(m.get("train_loss")), str(j.trained_tokens or 0), error)  # fmt: skip
    Console().print(table)


list_and_show(jobs_app, "job", lambda c: c.list_jobs(), lambda c, job_id: c.get_job(job_id), print_jobs, "JOB_ID")


def _hyperparameters(items: list[str]) -> dict:
    hp = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        try:
            hp[key] = json.loads(value)
        except json.JSONDecodeError:
            hp[key] = value
    return hp


@jobs_app.command("create")
def jobs_create(
    train_file: Annotated[Path, typer.Argument(help="JSONL training file (uploaded first).")],
    adapter_name: Annotated[str | None, typer.Option("--adapter-name", "-n", help="Name to serve the adapter under "
                                                     "(default: one the server makes up).")] = None,  # fmt: skip
    validation_file: Annotated[Path | None, typer.Option(help="JSONL validation file (its loss is reported).")] = None,
    method: Annotated[str, typer.Option(help="lora (= supervised) or switchlora.")] = "lora",
    hyperparameter: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE hyperparameter (JSON value), "
                                                             "repeatable: those of `loraplex train`.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an adapter of that name on success.")] = False,
    wait: Annotated[bool, typer.Option(help="Follow the job: step, loss, elapsed time, ETA, then a summary.")] = False,
    url: Url = DEFAULT_URL,
    api_key: Key = None,
) -> None:
    """Upload the file(s) and start a job (its id is printed first)."""
    hp = _hyperparameters(hyperparameter or [])
    for path in filter(None, (train_file, validation_file)):
        if not path.is_file():
            fail(f"{path}: no such file")
    with client(url, api_key) as c:
        uploaded: list[str] = []
        try:
            uploaded.append(run(lambda: c.upload_file(train_file), url).id)
            if validation_file:
                uploaded.append(run(lambda: c.upload_file(validation_file), url).id)
            job = run(lambda: c.create_job(uploaded[0], adapter_name, {"type": method, "hyperparameters": hp},
                                           uploaded[1] if validation_file else None, seed, overwrite=overwrite), url)
        except typer.Exit:
            for file_id in uploaded:  # a refused job keeps nothing it uploaded
                try:
                    c.delete_file(file_id)
                except Exception:  # the refusal is the message that matters
                    pass
            raise
        typer.echo(job.id)
        if wait:
            follow_job(c, job, url)


def follow_job(c, job, url: str) -> None:
    """A progress bar (steps, loss over the last 10 steps, elapsed, ETA) until the job ends, then its summary."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.monotonic()
    m = job.metrics or {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task(job.adapter_name, total=m.get("total_steps"), completed=m.get("step", 0),
                                 status=job.status)  # fmt: skip

        def follow() -> None:
            for e in c.stream_job_events(job.id):
                d = e.data or {}
                if "loss" in d:
                    loss = d.get("mean_loss", d["loss"])
                    progress.update(task, completed=d["step"], total=d["total_steps"], status=f"loss {loss:.4f}")
                else:
                    if "total_steps" in d:
                        progress.update(task, total=d["total_steps"], status="running")
                    progress.console.print(f"{_when(e.created_at)}  {e.message}")

        run(follow, url)
    done = run(lambda: c.get_job(job.id), url)
    m = done.metrics or {}
    took = f"{time.monotonic() - started:.0f} s"
    if done.status != "succeeded":
        message = done.error.message if hasattr(done.error, "message") else (done.error or "")
        fail(f"job {done.id} {done.status} after {m.get('step', 0)} steps ({took}){': ' + message if message else ''}")
    val = f", validation loss {_loss(m['eval_loss'])}" if m.get("eval_loss") is not None else ""
    typer.echo(f"succeeded in {took}: {m.get('steps', m.get('step', 0))} steps, {done.trained_tokens or 0} trained "
               f"tokens, loss {_loss(m.get('train_loss'))}{val}; adapter '{done.fine_tuned_model or done.adapter_name}' "
               "is servable (\"model\": its name)")  # fmt: skip


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = DEFAULT_URL, api_key: Key = None, as_json: Json = False) -> None:
    """Cancel a queued or running job."""
    print_jobs([call(url, api_key, lambda c: c.cancel_job(job_id))], as_json)


@jobs_app.command("events")
def jobs_events(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until the job ends.")] = False,
                url: Url = DEFAULT_URL, api_key: Key = None, as_json: Json = False) -> None:  # fmt: skip
    """Print a job's events with their times (the loss curve included; --json: one JSON object a line)."""
    with client(url, api_key) as c:

        def show() -> None:
            for e in c.stream_job_events(job_id) if follow else c.job_events(job_id):
                typer.echo(e.model_dump_json() if as_json else f"{_when(e.created_at)}  {e.level:<7}  {e.message}")

        run(show, url)

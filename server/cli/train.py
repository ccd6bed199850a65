"""Train an adapter offline (no server), with a progress bar; the options are a job's hyperparameters. The base model
and its converted copy are the server's (`--model` / `LORAPLEX_MODEL`, `--data-dir` / `LORAPLEX_DATA_DIR`,
`--cache-dir` / `LORAPLEX_CACHE_DIR`), so `loraplex train` next to `loraplex serve` converts nothing twice."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapters.training.config import TrainConfig
from server.cli.options import build, given, options_of, with_options


def train(
    train_file: Annotated[Path, typer.Argument(help="JSONL: {prompt, completion} or {messages} per line.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the PEFT adapter to.")],
    threads: Annotated[int | None, typer.Option(help="Torch threads.")] = None,
    data_dir: Annotated[Path | None, typer.Option(envvar="LORAPLEX_DATA_DIR", help="The server's data directory: the "
                                                  "default model's converted copy is cached under it.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(envvar="LORAPLEX_CACHE_DIR", help="Where the converted default "
                                                   "model is kept (default: <data-dir>/cache).")] = None,
    **options,
) -> None:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from adapters.training.data import DataError
    from adapters.training.trainer import train as run_training
    from server.engine.model import DEFAULT_MODEL_ID, prepare_default_model
    from server.settings import Settings

    if not train_file.is_file():
        raise FileNotFoundError(2, "no such file", str(train_file))
    if threads:
        torch.set_num_threads(threads)
    fields = given(options, TrainConfig)
    server = Settings(**{k: v for k, v in (("data_dir", data_dir), ("cache_dir", cache_dir)) if v is not None})
    fields.setdefault("model", server.model)  # LORAPLEX_MODEL, as the server reads it
    if fields.get("model") in (None, DEFAULT_MODEL_ID):
        fields["model"] = str(prepare_default_model(server.model_cache_dir))
    cfg = build(TrainConfig, train_file=train_file, out_dir=out, **fields)
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


with_options(train, options_of(TrainConfig, exclude={"train_file", "out_dir", "max_examples"}))

"""The `loraplex` command (also `python -m server`).

- `serve` (`server.cli.serve`): the server, every setting an option.
- `train` (`server.cli.train`): an adapter offline, no server.
- `adapters ...`, `jobs ...` (`server.cli.remote`): a running server's adapters and jobs, through `client` (the
  only commands that import it); `adapters pull` fetches from where users keep adapters (`server.cli.sources`).

A user's mistake (a missing file, a bad setting, a server that cannot be reached) is one line saying what is wrong
and what to do, never a traceback; `--debug` (or `LORAPLEX_DEBUG=1`) shows the traceback.
"""

from __future__ import annotations

import os

import click
import typer
from typer.core import TyperGroup

from server.cli import jobs, remote, serve, train


def describe(error: BaseException) -> str:
    """One line for an error no command turned into a message of its own."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename + ': ' if error.filename else ''}{error.strerror}"
    text = " ".join(str(error).split()) or error.__class__.__name__
    return text if isinstance(error, ValueError) else f"{error.__class__.__name__}: {text}"


class OneLineErrors(TyperGroup):
    """The command group whose uncaught errors print as one line (exit 1), unless `--debug`."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if ctx.meta.get("loraplex.debug") or os.environ.get("LORAPLEX_DEBUG") in ("1", "true"):
                raise
            expected = isinstance(e, (ValueError, OSError))  # a user's mistake, said in full by its message
            typer.secho(f"error: {describe(e)}{'' if expected else '  (--debug shows the traceback)'}", fg="red", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False, help="loraplex: many LoRA adapters, one base model.")  # fmt: skip
app.command("serve", help=serve.__doc__)(serve.serve)
app.command("train", help=train.__doc__)(train.train)
app.add_typer(remote.adapters_app, name="adapters")
app.add_typer(jobs.jobs_app, name="jobs")


@app.callback()
def main(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """loraplex command line."""
    ctx.meta["loraplex.debug"] = debug

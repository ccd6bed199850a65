"""The `loraplex` command (also `python -m server`).

- `serve` (`server.cli.serve`): the server, every setting an option.
- `train` (`server.cli.train`): an adapter offline, no server.
- `adapters ...`, `jobs ...` (`server.cli.remote`): a running server's adapters and jobs, through `client` (the
  only commands that import it).
"""

from __future__ import annotations

import typer

from server.cli import remote, serve, train

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="loraplex: many LoRA adapters, one base model.")  # fmt: skip
app.command("serve", help=serve.__doc__)(serve.serve)
app.command("train", help=train.__doc__)(train.train)
app.add_typer(remote.adapters_app, name="adapters")
app.add_typer(remote.jobs_app, name="jobs")


@app.callback()
def main() -> None:
    """loraplex command line."""

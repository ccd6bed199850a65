"""The commands that talk to a running server: `loraplex adapters ...` (here) and `loraplex jobs ...`
(`server.cli.jobs`), through `client`. The server's address is `--url` or `LORAPLEX_URL`, its key `--api-key` or
`LORAPLEX_API_KEY`; a server error is printed as its one-line message with what to do, never a traceback; list and
show commands print JSON with `--json`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

adapters_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage the adapters of a running server.")

DEFAULT_URL = "http://127.0.0.1:8000"
Url = Annotated[str, typer.Option("--url", envvar="LORAPLEX_URL", help="Server address.")]
Key = Annotated[str | None, typer.Option("--api-key", envvar="LORAPLEX_API_KEY", help="API key (admin scope to write).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def client(url: str, api_key: str | None):
    from client import LoraplexClient

    return LoraplexClient(url, api_key=api_key, max_retries=1)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def run(fn, url: str):
    """Call the server; on failure print one line (the server's message and what to do) and exit 1."""
    from client import APIConnectionError, AuthenticationError, ConflictError, LoraplexError

    try:
        return fn()
    except APIConnectionError as e:
        reason = e.message.partition(" (")[2].rstrip(")") or e.message
        fail(f"cannot reach the loraplex server at {url} ({reason}): start it with `loraplex serve`, or point to "
             "yours with --url URL or LORAPLEX_URL=URL")  # fmt: skip
    except ConflictError as e:
        fail(e.message.split(" (")[0] + (": pass --overwrite to replace it" if e.code == "adapter_exists" else ""))
    except AuthenticationError as e:
        fail(f"{e.message} (pass --api-key KEY or set LORAPLEX_API_KEY)")
    except LoraplexError as e:
        fail(e.message)


def call(url: str, api_key: str | None, fn):
    """`fn(client)` against the server, as `run` reports failures."""
    with client(url, api_key) as c:
        return run(lambda: fn(c), url)


def print_json(items) -> None:
    data = [i.model_dump(mode="json") for i in items] if isinstance(items, list) else items.model_dump(mode="json")
    typer.echo(json.dumps(data, indent=2))


def print_adapters(adapters, as_json: bool = False) -> None:
    if as_json:
        return print_json(adapters)
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "version", "rank", "alpha", "target modules", "size", "owner", "sha256")
    for a in adapters:
        table.add_row(a.id, str(a.version), str(a.rank), str(a.alpha), ",".join(a.target_modules),
                      f"{a.size_bytes / 2**20:.1f} MiB", a.owned_by or "", (a.sha256 or "")[:12])  # fmt: skip
    Console().print(table)


def list_and_show(app: typer.Typer, noun: str, fetch_all, fetch_one, printer, metavar: str) -> None:
    """`list` (a table, or JSON) and `show ID` (JSON) commands of `app`, for one kind of object."""

    @app.command("list", help=f"List the {noun}s.")
    def list_(url: Url = DEFAULT_URL, api_key: Key = None, as_json: Json = False) -> None:
        printer(call(url, api_key, fetch_all), as_json)

    @app.command("show", help=f"Show one {noun} as JSON.")
    def show(id: str, url: Url = DEFAULT_URL, api_key: Key = None) -> None:
        print_json(call(url, api_key, lambda c: fetch_one(c, id)))

    show.__annotations__["id"] = Annotated[str, typer.Argument(metavar=metavar)]  # typer reads it when it runs


def _upload(c, name: str, overwrite: bool, url: str, directory: Path | None = None, archive: Path | None = None):
    kw = {"directory": directory} if directory is not None else {"archive": archive}
    return run(lambda: c.upload_adapter(name, overwrite=overwrite, **kw), url)


Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing adapter of that name.")]


@adapters_app.command("upload")
def adapters_upload(
    name: str,
    path: Annotated[Path, typer.Argument(help="A PEFT adapter directory, or a .zip / .tar.gz of one.")],
    overwrite: Overwrite = False,
    url: Url = DEFAULT_URL,
    api_key: Key = None,
    as_json: Json = False,
) -> None:
    """Upload an adapter; it is servable when this returns."""
    from server.cli.sources import fetch

    fetched = fetch(str(path), Path("."))  # a local path: nothing is fetched, only checked
    with client(url, api_key) as c:
        print_adapters([_upload(c, name, overwrite, url, fetched.directory, fetched.archive)], as_json)


@adapters_app.command("pull")
def adapters_pull(
    name: str,
    source: Annotated[str, typer.Argument(help="A folder, a .zip / .tar.gz, hf://ORG/REPO[/SUBFOLDER][@REVISION], or "
                                               "an fsspec URL (s3://…, https://…) of a folder or archive.")],
    overwrite: Overwrite = False,
    url: Url = DEFAULT_URL,
    api_key: Key = None,
    as_json: Json = False,
) -> None:
    """Fetch an adapter from where it is kept (here, not on the server) and upload it."""
    from server.cli.sources import fetch

    scratch = Path(tempfile.mkdtemp(prefix="loraplex-pull-"))
    try:
        fetched = fetch(source, scratch)
        with client(url, api_key) as c:
            print_adapters([_upload(c, name, overwrite, url, fetched.directory, fetched.archive)], as_json)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@adapters_app.command("delete")
def adapters_delete(name: str, url: Url = DEFAULT_URL, api_key: Key = None) -> None:
    """Delete an adapter (requests already running finish first)."""
    call(url, api_key, lambda c: c.delete_adapter(name))
    typer.echo(f"deleted {name}")


@adapters_app.command("download")
def adapters_download(
    name: str,
    dest: Annotated[Path, typer.Argument(help="A folder (created, or NAME/ inside an existing one), or a file "
                                             "NAME.tar.gz for the archive.")] = Path("."),  # fmt: skip
    extract: Annotated[bool | None, typer.Option("--extract/--archive", help="Write the folder / the .tar.gz whatever "
                                                 "DEST's name says.", show_default=False)] = None,  # fmt: skip
    url: Url = DEFAULT_URL,
    api_key: Key = None,
) -> None:
    """Download an adapter's PEFT files: the folder, or a .tar.gz when DEST ends in .tar.gz."""
    typer.echo(str(call(url, api_key, lambda c: c.download_adapter(name, dest, extract))))


list_and_show(adapters_app, "adapter", lambda c: c.list_adapters(), lambda c, name: c.get_adapter(name), print_adapters,
              "NAME")  # fmt: skip

"""`python -m server.cli ...` is `loraplex ...`."""

from server.cli import app

app()

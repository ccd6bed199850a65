"""`python -m server` is `loraplex serve`."""

import sys

from server.cli import app

app(["serve", *sys.argv[1:]])

"""`python -m server` is `loraplex serve`."""

import sys

from server.cli import app

if __name__ == "__main__":  # not when a spawned training worker imports the main module
    app(["serve", *sys.argv[1:]])

"""`python -m flows.cli`: the `scoder` command (flows.cli.main), for when the console script is not installed."""

import sys

from flows.cli import main

if __name__ == "__main__":
    sys.exit(main())

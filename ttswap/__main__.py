"""``python -m ttswap``: the command line (see ``ttswap.cli``)."""

import sys

from ttswap.cli import main

if __name__ == "__main__":
    sys.exit(main())

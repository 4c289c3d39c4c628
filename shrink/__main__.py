"""``python -m shrink`` runs the command line."""

import sys

from shrink.cli import main

if __name__ == "__main__":
    sys.exit(main())

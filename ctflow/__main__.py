"""``python -m ctflow`` runs the command line (:func:`ctflow.cli.main`)."""
import sys

from ctflow.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m dse.corpus``: see :mod:`dse.training.corpus`."""
import sys

from dse.training.corpus import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m dse.train``: see :mod:`dse.training.train`."""
import sys

from dse.training.train import main

if __name__ == "__main__":
    sys.exit(main())

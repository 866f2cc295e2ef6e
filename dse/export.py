"""``python -m dse.export``: see :mod:`dse.deploy.export`."""
import sys

from dse.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())

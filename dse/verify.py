"""``python -m dse.verify``: see :mod:`dse.deploy.verify`."""
import sys

from dse.deploy.verify import main

if __name__ == "__main__":
    sys.exit(main())

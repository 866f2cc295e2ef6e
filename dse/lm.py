"""``python -m dse.lm``: see :mod:`dse.training.lm_build`."""
import sys

from dse.training.lm_build import main

if __name__ == "__main__":
    sys.exit(main())

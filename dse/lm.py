"""``python -m dse.lm``: see :mod:`dse.training.lm_build`."""
from dse.core.errors import exit_with
from dse.training.lm_build import main

if __name__ == "__main__":
    exit_with(main)

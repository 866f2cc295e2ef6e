"""``python -m dse.corpus``: see :mod:`dse.training.corpus`."""
from dse.core.errors import exit_with
from dse.training.corpus import main

if __name__ == "__main__":
    exit_with(main)

"""``python -m dse.train``: see :mod:`dse.training.train`."""
from dse.core.errors import exit_with
from dse.training.train import main

if __name__ == "__main__":
    exit_with(main)

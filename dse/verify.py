"""``python -m dse.verify``: see :mod:`dse.deploy.verify`."""
from dse.core.errors import exit_with
from dse.deploy.verify import main

if __name__ == "__main__":
    exit_with(main)

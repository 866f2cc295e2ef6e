"""``python -m dse.export``: see :mod:`dse.deploy.export`."""
from dse.core.errors import exit_with
from dse.deploy.export import main

if __name__ == "__main__":
    exit_with(main)

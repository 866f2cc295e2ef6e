"""``python -m dse.transcribe``: see :mod:`dse.deploy.transcribe`."""
from dse.core.errors import exit_with
from dse.deploy.transcribe import main

if __name__ == "__main__":
    exit_with(main)

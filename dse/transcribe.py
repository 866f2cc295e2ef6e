"""``python -m dse.transcribe``: see :mod:`dse.deploy.transcribe`."""
import sys

from dse.deploy.transcribe import main

if __name__ == "__main__":
    sys.exit(main())

"""Design-space exploration for streaming Emformer RNN-T recognition on CPUs.

The names users call are re-exported here and imported lazily, so that importing
``dse`` (or ``dse.runtime``) does not pull in Optuna or the dashboard.
"""
from __future__ import annotations

import importlib

__all__ = ["DSEError", "TrialConfig", "StreamingRecognizer", "load_model", "build_recognizer", "measure"]
__version__ = "0.1.0"

_WHERE = {
    "DSEError": "dse.errors",
    "TrialConfig": "dse.config",
    "StreamingRecognizer": "dse.stream",
    "load_model": "dse.models",
    "build_recognizer": "dse.transforms",
    "measure": "dse.measure",
}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dse' has no attribute {name!r}")

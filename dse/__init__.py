"""Design-space exploration for streaming Emformer RNN-T recognition on CPUs.

The names users call are re-exported here and imported lazily, so that importing
``dse`` (or ``dse.deploy.runtime``) does not pull in Optuna or the dashboard.
"""
from __future__ import annotations

from dse.core._lazy import lazy_exports

__version__ = "0.1.0"

__all__, __getattr__ = lazy_exports(__name__, {
    "dse.core.errors": "DSEError",
    "dse.core.config": "TrialConfig",
    "dse.core.stream": "StreamingRecognizer",
    "dse.core.models": "load_model",
    "dse.core.build": "build_recognizer",
    "dse.core.measure": "measure",
    "dse.deploy.runtime": "load",
})

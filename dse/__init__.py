"""Design-space exploration for streaming Emformer RNN-T recognition on CPUs.

The names users call are re-exported here and imported lazily, so that importing
``dse`` (or ``dse.deploy.runtime``) does not pull in Optuna or the dashboard.
"""
from __future__ import annotations

import os as _os
import sys as _sys

from dse.core._lazy import lazy_exports

# OpenMP threads that wait for work by spinning keep a core busy; on a shared or
# oversubscribed machine a chunk then waits for a core that the spinner holds (a 30x
# slowdown, DESIGN.md). torch's libgomp reads the policy once, when torch is first imported,
# so it is set here, before any dse module imports torch, unless the environment sets it.
# A deployment on dedicated, otherwise idle cores may set OMP_WAIT_POLICY=ACTIVE.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

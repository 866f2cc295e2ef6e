"""Design-space exploration for streaming Emformer RNN-T recognition on CPUs.

The names users call are re-exported here and imported lazily, so that importing
``dse`` (or ``dse.deploy.runtime``) does not pull in Optuna or the dashboard.
"""
from __future__ import annotations

from dse.core._lazy import lazy_exports

# OpenMP's wait policy is left as the environment sets it (libgomp reads it once, when torch is
# imported) and recorded with every timed pass. PASSIVE protects a timing from a neighbour
# that holds a core (DESIGN.md: a 30x slowdown while spinning), but on a quiet machine it
# costs the embedded default 1.7x (RTF 0.127 against 0.073 with ACTIVE, 24 eval utterances,
# 2 threads): dse keeps the fast default and flags a busy machine instead (load_warning).

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

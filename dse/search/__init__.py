"""The search: spaces, the study (objective, pruning, reuse), adaptation, storage.
Stands on :mod:`dse.core`.
Its public names are imported on first use (:mod:`dse.core._lazy`).
"""
from dse.core._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {"dse.search.space": "Space load_space", "dse.search.study": "run_trial TrialContext", "dse.search.storage": "make_storage DEFAULT_STORAGE", "dse.search.adapt": "Adapter"})

"""Training: the synthetic corpus, the trainer and the language-model builder.
Stands on :mod:`dse.core`.
Its public names are imported on first use (:mod:`dse.core._lazy`).
"""
from dse.core._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {"dse.training.corpus": "generate"})

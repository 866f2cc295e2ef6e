"""The core: configuration and knob registry, models, features, audio, data sets, MoE,
precision, the one build of a recognizer, streaming, LM fusion, measurement, cost model,
errors. It imports nothing else of dse.
Its public names are imported on first use (:mod:`dse.core._lazy`).
"""
from dse.core._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {"dse.core.errors": "DSEError ConfigError", "dse.core.config": "TrialConfig KNOBS", "dse.core.models": "load_model LoadedModel", "dse.core.build": "build_recognizer Built", "dse.core.stream": "StreamingRecognizer", "dse.core.measure": "interleaved_speedup load_eval_audio", "dse.core.cost": "flops_per_chunk"})

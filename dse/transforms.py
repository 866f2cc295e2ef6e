"""Turn a :class:`~dse.config.TrialConfig` into a runnable streaming recognizer.

Order of transforms (each owns the knobs :data:`dse.config.KNOBS` assigns to it):

1. ``geometry``: right context and segment length: the Emformer is rebuilt with the
   new values and the same weights (its parameters do not depend on them).
2. ``moe``: feed-forward blocks replaced by upcycled MoE blocks (:mod:`dse.moe`).
3. ``frontend``: mel window/hop.
4. ``adapt``: when ``adapt_steps > 0``, fine-tuned weights for exactly this edit,
   from the adaptation cache or made by :mod:`dse.adapt`.
5. ``precision``: bf16/fp16 weights with inputs and Emformer state in that dtype;
   int8 dynamic quantisation of every Linear layer (the predictor's LSTM is built
   from Linear layers in torchaudio, so it is quantised too); ``amp-*`` autocast.
6. ``compile``: ``torch.compile`` of the transcriber's per-chunk ``infer``.
7. ``decoder``/``runtime``: beam width, language-model fusion weight and threads.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

from dse.config import TrialConfig
from dse.errors import ConfigError, DSEError
from dse.models import LoadedModel, build
from dse.precision import AUTOCAST, DTYPES, apply_precision
from dse.stream import StreamingRecognizer



class TrialFailed(DSEError):
    """A configuration that validates but cannot be built or run (e.g. a compile failure)."""


@dataclasses.dataclass
class Built:
    recognizer: StreamingRecognizer
    loaded: LoadedModel          # the edited model before precision/compile (fp32)
    config: TrialConfig          # resolved: geometry filled in
    params: int
    weight_mib: float
    build_s: float
    compile_s: Optional[float]
    adapt_info: dict


def needs_adaptation(loaded: LoadedModel, config: TrialConfig) -> bool:
    """True when an edit leaves the trained weights out of their training conditions."""
    return config.is_moe or (config.window_samples, config.hop_samples) != (
        loaded.features.window_samples, loaded.features.hop_samples)


def edit_architecture(loaded: LoadedModel, config: TrialConfig, seed: int = 0) -> LoadedModel:
    """Geometry, MoE and front-end edits in fp32; returns a new LoadedModel (``loaded`` untouched)."""
    from dse.moe import apply_moe

    config.validate_for(loaded.arch)
    cfg = config.resolved(loaded.arch)
    arch = dict(loaded.arch, right_context_length=cfg.right_context_frames, segment_length=cfg.segment_frames)
    model = build(arch, loaded.tokenizer.num_symbols)
    model.load_state_dict(loaded.model.state_dict())
    info = dict(loaded.info)
    if cfg.is_moe:
        dense = arch["transformer_ffn_dim"]
        if cfg.moe_hidden > dense:
            raise ConfigError(f"moe_hidden={cfg.moe_hidden} exceeds the dense FFN width {dense} of this model")
        layers = apply_moe(model, cfg.moe_experts, cfg.moe_top_k, cfg.moe_hidden or dense, cfg.moe_every, seed=seed)
        if not layers:
            raise ConfigError(f"moe_every={cfg.moe_every} selects no layer of a {arch['transformer_num_layers']}-layer model")
        info["moe_layers"] = layers
    features = dataclasses.replace(loaded.features, window_samples=cfg.window_samples, hop_samples=cfg.hop_samples)
    return dataclasses.replace(loaded, arch=arch, model=model.eval(), features=features, info=info)


def _compile(model, mode: str) -> float:
    """Compile the transcriber's per-chunk ``infer`` in place; returns 0 (time is taken at first call)."""
    kwargs = {} if mode == "default" else {"mode": mode}
    model.transcriber.infer = torch.compile(model.transcriber.infer, dynamic=False, **kwargs)
    return 0.0


def build_recognizer(loaded: LoadedModel, config: TrialConfig,
                     adapt_fn: Optional[Callable[[LoadedModel, TrialConfig], tuple[dict, dict]]] = None,
                     warmup_audio: Optional[torch.Tensor] = None) -> Built:
    """Apply every transform of ``config`` to ``loaded``; ``adapt_fn`` supplies adapted weights.

    With ``compile`` on, one warm-up utterance (``warmup_audio`` or 2 s of silence) is
    streamed here so that the compile time is measured as ``compile_s``, apart from
    the timed run.
    """
    from dse.measure import weight_mib

    t0 = time.perf_counter()
    edited = edit_architecture(loaded, config)
    cfg = config.resolved(loaded.arch)
    adapt_info: dict = {}
    if cfg.adapt_steps > 0:
        if adapt_fn is None:
            raise ConfigError("adapt_steps > 0 needs an adaptation function (use dse.adapt)")
        state, adapt_info = adapt_fn(edited, cfg)
        edited.model.load_state_dict(state)
        if "mean" in adapt_info:
            edited = dataclasses.replace(edited, mean=torch.tensor(adapt_info["mean"]),
                                         invstd=torch.tensor(adapt_info["invstd"]))
    deployed = apply_precision(edited.model, cfg.precision)
    autocast = AUTOCAST.get(cfg.precision)
    if cfg.compile != "off":
        _compile(deployed, cfg.compile)
    lm = None
    if cfg.lm_weight > 0:
        from dse.lm import load_cached

        if edited.lm_path is None:
            raise ConfigError(f"lm_weight={cfg.lm_weight} needs a character language model and this model has "
                              "none: pass --lm FILE (python -m dse.lm build makes one) or set lm_weight 0")
        lm = load_cached(edited.lm_path)
    rec = StreamingRecognizer(deployed, edited.logmel(), edited.tokenizer, cfg.segment_frames,
                              cfg.right_context_frames, beam_width=cfg.beam_width,
                              dtype=DTYPES.get(cfg.precision, torch.float32), autocast_dtype=autocast,
                              lm=lm, lm_weight=cfg.lm_weight, temperature=cfg.temperature)
    build_s = time.perf_counter() - t0
    compile_s = None
    if cfg.compile != "off":
        t1 = time.perf_counter()
        try:
            rec.transcribe(warmup_audio if warmup_audio is not None else torch.zeros(2 * edited.features.sample_rate))
        except Exception as exc:
            raise TrialFailed(f"torch.compile(mode={cfg.compile}) failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
        compile_s = time.perf_counter() - t1
    return Built(rec, edited, cfg, sum(p.numel() for p in edited.model.parameters()), weight_mib(deployed),
                 build_s, compile_s, adapt_info)

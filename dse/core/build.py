"""The one recipe that turns a configuration and weights into a streaming recognizer.

The study (:func:`build_recognizer`) and the deployment runtime (:mod:`dse.deploy.runtime`,
through :func:`module_for`, :func:`deploy` and :func:`assemble`) build with these functions
only, so a bundle streams exactly what its trial measured.

Each transform of the knob registry (:mod:`dse.core.knobs`) names its apply function
here; they run stage by stage:

1. ``architecture`` (fp32): :func:`apply_geometry` (right context and segment: the Emformer
   rebuilt with the same weights, which do not depend on them), :func:`apply_moe_knobs`
   (feed-forward blocks upcycled into MoE blocks, :mod:`dse.core.moe`), :func:`apply_frontend`
   (mel window/hop), and any registered transform of that stage.
2. ``weights``: when ``adapt_steps > 0``, fine-tuned weights for exactly this edit from the
   caller's adaptation function (the study's :class:`~dse.search.adapt.Adapter`).
3. ``deploy``: :func:`apply_precision_knob` (bf16/fp16 weights, int8 dynamic quantisation of
   every Linear layer, or ``amp-*`` autocast), then :func:`apply_compile` (``torch.compile``
   of the transcriber's per-chunk ``infer``).
4. ``decoder``: :func:`decoder_options` (beam width, LM fusion weight, temperature).
5. ``runtime``: :func:`apply_threads` before anything is timed.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

from dse.core.config import TrialConfig
from dse.core.errors import ConfigError, DSEError
from dse.core.knobs import transforms_at
from dse.core.models import LoadedModel, build
from dse.core.precision import AUTOCAST, DTYPES, apply_precision, weight_mib
from dse.core.stream import StreamingRecognizer


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


# -- architecture stage ---------------------------------------------------------------------
def apply_geometry(loaded: LoadedModel, config: TrialConfig) -> LoadedModel:
    """The Emformer rebuilt with the configuration's right context and segment length."""
    arch = dict(loaded.arch, right_context_length=config.right_context_frames, segment_length=config.segment_frames)
    model = build(arch, loaded.tokenizer.num_symbols)
    model.load_state_dict(loaded.model.state_dict())
    return dataclasses.replace(loaded, arch=arch, model=model.eval())


def moe_spec(arch: dict, config: TrialConfig) -> Optional[dict]:
    """The MoE edit ``config`` asks of a model of ``arch``: experts, top-k, hidden units and
    the index of every converted layer (``None`` for a dense model). The one place that
    decides which layers become MoE (the cost model and bundles read it)."""
    if not config.is_moe:
        return None
    dense = arch["transformer_ffn_dim"]
    if config.moe_hidden > dense:
        raise ConfigError(f"moe_hidden={config.moe_hidden} exceeds the dense FFN width {dense} of this model")
    from dse.core.moe import moe_layer_indices

    layers = moe_layer_indices(arch["transformer_num_layers"], config.moe_every)
    if not layers:
        raise ConfigError(f"moe_every={config.moe_every} selects no layer of a "
                          f"{arch['transformer_num_layers']}-layer model")
    return {"experts": config.moe_experts, "top_k": config.moe_top_k, "hidden": config.moe_hidden or dense,
            "every": config.moe_every, "layers": layers}


def apply_moe_knobs(loaded: LoadedModel, config: TrialConfig, seed: int = 0) -> LoadedModel:
    """Feed-forward blocks upcycled into mixture-of-experts blocks (a no-op for a dense model)."""
    from dse.core.moe import apply_moe

    spec = moe_spec(loaded.arch, config)
    if spec is None:
        return loaded
    layers = apply_moe(loaded.model, spec["experts"], spec["top_k"], spec["hidden"], spec["every"], seed=seed)
    if layers != spec["layers"]:
        raise TrialFailed(f"MoE edit converted layers {layers}, expected {spec['layers']}")
    return dataclasses.replace(loaded, info=dict(loaded.info, moe_layers=layers))


def apply_frontend(loaded: LoadedModel, config: TrialConfig) -> LoadedModel:
    """The mel front end with the configuration's window and hop (samples)."""
    features = dataclasses.replace(loaded.features, window_samples=config.window_samples,
                                   hop_samples=config.hop_samples)
    return dataclasses.replace(loaded, features=features)


def edit_architecture(loaded: LoadedModel, config: TrialConfig) -> LoadedModel:
    """Every ``architecture``-stage transform in fp32; returns a new LoadedModel (``loaded`` untouched)."""
    config.validate_for(loaded.arch)
    cfg = config.resolved(loaded.arch)
    edited = loaded
    for transform in transforms_at("architecture"):
        edited = transform.function()(edited, cfg)
    if edited.model is loaded.model:  # no transform rebuilt it: never edit the caller's model
        model = build(edited.arch, loaded.tokenizer.num_symbols)
        model.load_state_dict(loaded.model.state_dict())
        edited = dataclasses.replace(edited, model=model)
    return dataclasses.replace(edited, model=edited.model.eval())


def module_for(arch: dict, num_symbols: int, moe: Optional[dict]) -> torch.nn.Module:
    """The fp32 module of ``arch`` with the MoE edit ``moe`` (:func:`moe_spec`), in eval mode:
    the structure a deployed state dict is loaded into."""
    from dse.core.moe import apply_moe

    model = build(arch, num_symbols)
    if moe:
        layers = apply_moe(model, moe["experts"], moe["top_k"], moe["hidden"], moe["every"], noise=0.0)
        if layers != moe["layers"]:
            raise ConfigError(f"MoE edit converts layers {layers}, the configuration records {moe['layers']}")
    return model.eval()


# -- weights stage --------------------------------------------------------------------------
def apply_adaptation(edited: LoadedModel, config: TrialConfig,
                     adapt_fn: Optional[Callable[[LoadedModel, TrialConfig], tuple[dict, dict]]]
                     ) -> tuple[LoadedModel, dict]:
    """Adapted weights (and front-end statistics) for ``config`` from ``adapt_fn``."""
    if config.adapt_steps <= 0:
        return edited, {}
    if adapt_fn is None:
        raise ConfigError("adapt_steps > 0 needs an adaptation function (use dse.search.adapt)")
    state, adapt_info = adapt_fn(edited, config)
    edited.model.load_state_dict(state)
    if "mean" in adapt_info:
        edited = dataclasses.replace(edited, mean=torch.tensor(adapt_info["mean"]),
                                     invstd=torch.tensor(adapt_info["invstd"]))
    return edited, adapt_info


# -- deploy stage ---------------------------------------------------------------------------
def apply_precision_knob(model: torch.nn.Module, config: TrialConfig) -> torch.nn.Module:
    """The deployed form for ``config.precision`` (a copy: the fp32 model stays usable)."""
    return apply_precision(model, config.precision)


def apply_compile(model: torch.nn.Module, config: TrialConfig) -> torch.nn.Module:
    """``torch.compile`` of the transcriber's per-chunk ``infer`` (in place), for ``config.compile != "off"``."""
    if config.compile != "off":
        kwargs = {} if config.compile == "default" else {"mode": config.compile}
        model.transcriber.infer = torch.compile(model.transcriber.infer, dynamic=False, **kwargs)
    return model


def deploy(model: torch.nn.Module, config: TrialConfig) -> torch.nn.Module:
    """Every ``deploy``-stage transform: precision, then compile."""
    for transform in transforms_at("deploy"):
        model = transform.function()(model, config)
    return model


# -- decoder and runtime stages -------------------------------------------------------------
def decoder_options(config: TrialConfig, lm_path: Optional[str] = None, lm=None) -> dict:
    """Keyword arguments of :class:`StreamingRecognizer` for the decoder knobs; the language
    model is ``lm`` or loaded from ``lm_path`` when ``lm_weight > 0``."""
    if config.lm_weight > 0 and lm is None:
        from dse.core.lm import load_cached

        if lm_path is None:
            raise ConfigError(f"lm_weight={config.lm_weight} needs a character language model and this model has "
                              "none: pass --lm FILE (python -m dse.lm build makes one) or set lm_weight 0")
        lm = load_cached(lm_path)
    return {"beam_width": config.beam_width, "lm": lm if config.lm_weight > 0 else None,
            "lm_weight": config.lm_weight, "temperature": config.temperature}


def apply_threads(config: TrialConfig) -> None:
    """Intra-op threads for the timed run."""
    torch.set_num_threads(config.threads)


def assemble(deployed: torch.nn.Module, logmel, tokenizer, config: TrialConfig, lm_path: Optional[str] = None,
             lm=None) -> StreamingRecognizer:
    """The streaming recognizer of a deployed module for a resolved ``config``."""
    options = {}
    for transform in transforms_at("decoder"):
        options.update(transform.function()(config, lm_path=lm_path, lm=lm))
    return StreamingRecognizer(deployed, logmel, tokenizer, config.segment_frames, config.right_context_frames,
                               dtype=DTYPES.get(config.precision, torch.float32),
                               autocast_dtype=AUTOCAST.get(config.precision), **options)


def warm_compile(recognizer: StreamingRecognizer, config: TrialConfig, sample_rate: int,
                 warmup_audio: Optional[torch.Tensor] = None) -> Optional[float]:
    """For a compiled configuration, stream one warm-up utterance (``warmup_audio`` or 2 s
    of silence) so that compilation happens here; returns its seconds (``None`` when not compiled)."""
    if config.compile == "off":
        return None
    t1 = time.perf_counter()
    try:
        recognizer.transcribe(warmup_audio if warmup_audio is not None else torch.zeros(2 * sample_rate))
    except Exception as exc:
        raise TrialFailed(f"torch.compile(mode={config.compile}) failed: {type(exc).__name__}: "
                          f"{str(exc)[:500]}") from exc
    return time.perf_counter() - t1


def build_recognizer(loaded: LoadedModel, config: TrialConfig,
                     adapt_fn: Optional[Callable[[LoadedModel, TrialConfig], tuple[dict, dict]]] = None,
                     warmup_audio: Optional[torch.Tensor] = None) -> Built:
    """Apply every transform of ``config`` to ``loaded``; ``adapt_fn`` supplies adapted weights.

    With ``compile`` on, one warm-up utterance (``warmup_audio`` or 2 s of silence) is
    streamed here so that the compile time is measured as ``compile_s``, apart from
    the timed run.
    """
    t0 = time.perf_counter()
    edited = edit_architecture(loaded, config)
    cfg = config.resolved(loaded.arch)
    edited, adapt_info = apply_adaptation(edited, cfg, adapt_fn)
    deployed = deploy(edited.model, cfg)
    rec = assemble(deployed, edited.logmel(), edited.tokenizer, cfg, lm_path=edited.lm_path)
    build_s = time.perf_counter() - t0
    compile_s = warm_compile(rec, cfg, edited.features.sample_rate, warmup_audio)
    return Built(rec, edited, cfg, sum(p.numel() for p in edited.model.parameters()), weight_mib(deployed),
                 build_s, compile_s, adapt_info)

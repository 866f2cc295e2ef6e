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
3. ``deploy``: :func:`apply_backend` (for ``backend=onnxruntime`` the encoder exported to ONNX
   from its fp32 weights, once per weights and geometry, int8 by ONNX Runtime's dynamic
   quantisation, and run in ONNX Runtime), :func:`apply_precision_knob` (bf16/fp16 weights,
   int8 dynamic quantisation of every Linear layer torch still runs, or ``amp-*`` autocast),
   then :func:`apply_compile` (``torch.compile`` of the transcriber's per-chunk step: the
   static-shape step of :mod:`dse.core.static_step` where it applies, else torchaudio's
   ``infer`` in its steady state, :class:`SteadyStateCompiled`; compiled once either way).
4. ``decoder``: :func:`decoder_options` (beam width, LM fusion weight, temperature).
5. ``runtime``: :func:`apply_threads` before anything is timed.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
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
    """A built recognizer and what building it cost.

    ``build_s``: seconds of the build, the encoder's ONNX export excluded (``export_s``);
    ``compile_s``: seconds of the compiling warm-up (``None``: not compiled), in which
    ``compile_graphs`` graphs were compiled; ``export_s``: seconds this build spent exporting
    (and quantising) the encoder for ``backend=onnxruntime`` (0 on an export-cache hit; ``None``
    for torch), with the details in ``export_info`` (``hit``, ``path``, ``key``, ``bytes``,
    ``precision``, ``original_export_s`` on a hit, ...).
    """
    recognizer: StreamingRecognizer
    loaded: LoadedModel          # the edited model before precision/compile (fp32)
    config: TrialConfig          # resolved: geometry filled in
    params: int
    weight_mib: float
    build_s: float
    compile_s: Optional[float]
    adapt_info: dict
    export_s: Optional[float] = None
    export_info: dict = dataclasses.field(default_factory=dict)
    compile_graphs: Optional[int] = None


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
def weights_digest(*modules: torch.nn.Module) -> str:
    """SHA-256 of the modules' weights (state dicts, names and bytes, in order)."""
    h = hashlib.sha256(b"")
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def encoder_identity(model: torch.nn.Module) -> str:
    """SHA-256 of the encoder's weights (its state dict, names and bytes): which weights an exported
    encoder holds, whether they came from a checkpoint, a random seed or an adaptation."""
    return weights_digest(model.transcriber)


def encoder_cache_key(model: torch.nn.Module, config: TrialConfig) -> str:
    """The export cache's key for ``model``'s encoder under ``config`` (resolved geometry): the
    configuration's weights key, the geometry (segment and right context, left context, memory,
    layers, width) and the model identity (:func:`encoder_identity`). Configurations that leave
    weights and geometry alone share one export."""
    emformer = model.transcriber.transformer
    geometry = {"segment_frames": config.segment_frames, "right_context_frames": config.right_context_frames,
                "left_context": emformer.left_context_length, "memory": emformer.max_memory_size,
                "layers": len(emformer.emformer_layers), "dim": emformer.emformer_layers[0].input_dim}
    material = json.dumps({"weights_key": config.weights_key(), "geometry": geometry,
                           "model": encoder_identity(model)}, sort_keys=True)
    return (f"emformer-L{geometry['layers']}-D{geometry['dim']}-s{config.segment_frames}r{config.right_context_frames}"
            f"-{hashlib.sha256(material.encode()).hexdigest()[:20]}")


def apply_backend(model: torch.nn.Module, config: TrialConfig, cache_dir=None) -> torch.nn.Module:
    """For ``backend=onnxruntime``, a shallow copy of ``model`` whose encoder, predictor and joiner
    run in ONNX Runtime (the search stays Python: :mod:`dse.core.onnx_decoder`).

    The encoder is exported from ``model``'s fp32 weights (int8: ONNX Runtime's dynamic
    quantisation of that export) through :func:`dse.core.onnx_encoder.encoder_onnx`, cached by
    :func:`encoder_cache_key` under ``cache_dir`` (default ``$DSE_ONNX_CACHE`` or
    ``~/.cache/dse/onnx``). The session's intra-op threads are ``config.threads``; they spin
    unless ``OMP_WAIT_POLICY=PASSIVE`` (:func:`~dse.core.onnx_encoder.default_spinning`), as
    torch's OpenMP threads do. The predictor and joiner are exported and quantised the same way,
    cached by :func:`decoder_cache_key`, and run with the same threads unless they are small
    (:func:`dse.core.ort_session.decoder_threads`: then on one). What the exports cost is on
    the transcriber's ``export_info`` (the decoder's under ``"decoder"``). A model the exporter refuses (a mixture of experts)
    raises :class:`TrialFailed` with the exporter's reason: never a silent fall-back to torch.
    """
    if config.backend == "torch":
        return model
    from dse.core import onnx_decoder, onnx_encoder

    chunk_frames = config.segment_frames + config.right_context_frames
    key = encoder_cache_key(model, config)
    decoder_key = decoder_cache_key(model)
    try:
        path, info = onnx_encoder.encoder_onnx(model, chunk_frames, config.precision, cache_dir=cache_dir, key=key)
        paths, decoder_info = onnx_decoder.decoder_onnx(model, config.precision, cache_dir=cache_dir, key=decoder_key)
        deployed = onnx_encoder.use_onnx_encoder(model, path, threads=config.threads,
                                                 spinning=onnx_encoder.default_spinning())
        deployed = onnx_decoder.use_onnx_decoder(deployed, paths["predictor"], paths["joiner"], threads=config.threads,
                                                 spinning=onnx_encoder.default_spinning())
    except onnx_encoder.BackendError as exc:
        raise TrialFailed(f"backend onnxruntime cannot run this configuration: {exc}") from exc
    deployed.transcriber.export_info = dict(info, path=str(path), key=key, decoder=dict(
        decoder_info, paths={k: str(v) for k, v in paths.items()}, key=decoder_key))
    return deployed


def decoder_cache_key(model: torch.nn.Module) -> str:
    """The export cache's key for ``model``'s predictor and joiner: the SHA-256 of their weights, which
    is all their graph depends on (an adaptation changes the weights, the geometry knobs do not)."""
    return f"rnnt-decoder-{weights_digest(model.predictor, model.joiner)[:24]}"


def apply_precision_knob(model: torch.nn.Module, config: TrialConfig) -> torch.nn.Module:
    """The deployed form for ``config.precision`` (a copy: the fp32 model stays usable)."""
    return apply_precision(model, config.precision)


def _whole_state(state: list) -> tuple:
    """``_EmformerLayer._unpack_state`` once the left context and memory are full: the whole
    slots ``(memory, lc_key, lc_val)``, with no ``past_length.item()`` for dynamo to specialise on."""
    return state[0], state[1], state[2]


def full_state_view(transcriber: torch.nn.Module) -> torch.nn.Module:
    """A view of ``transcriber`` (parameters shared, nothing copied) whose Emformer layers unpack
    their state whole (:func:`_whole_state`): what ``infer`` computes once the state is full.

    torchaudio's ``_EmformerLayer._unpack_state`` (private; this is the one place that replaces
    it) reads ``past_length`` with ``.item()`` and slices the state by it: a Python int that
    changes every chunk, on which ``torch.compile`` specialises and recompiles each chunk until
    its recompile limit, after which it runs eagerly. Once ``past_length`` reaches
    :func:`full_state_frames` the slices are the whole slots, so this view computes the same.
    """
    view = copy.copy(transcriber)
    view._modules = dict(transcriber._modules)
    emformer = copy.copy(transcriber.transformer)
    emformer._modules = dict(emformer._modules)
    layers = []
    for layer in transcriber.transformer.emformer_layers:
        twin = copy.copy(layer)
        object.__setattr__(twin, "_unpack_state", _whole_state)
        layers.append(twin)
    emformer.emformer_layers = torch.nn.ModuleList(layers)
    view.transformer = emformer
    return view


def full_state_frames(transcriber: torch.nn.Module) -> int:
    """``past_length`` (frames after time reduction) from which every layer's left context and
    memory are full: ``max(left context, memory slots x segment)``."""
    emformer = transcriber.transformer
    return max(emformer.left_context_length, emformer.max_memory_size * emformer.segment_length)


class SteadyStateCompiled:
    """``transcriber.infer`` compiled once for the steady state, eager while the state fills.

    The first ``ceil(full_state_frames / segment)`` chunks of a stream (the left context and
    memory filling) run eagerly; every later chunk runs one compiled :func:`full_state_view`
    (``dynamic=False``: its shapes no longer change). Compiling ``infer`` as it is recompiles on
    every chunk (the past length is a new Python int each time) until dynamo gives up and runs
    it eagerly. Graph breaks remain where torchaudio reads ``lengths`` with ``.item()`` (the
    padding mask, the key slicing): a fixed set of graphs, compiled on the first full chunk.
    """

    def __init__(self, transcriber: torch.nn.Module, mode: str):
        self.eager = transcriber.infer
        self.full_at = full_state_frames(transcriber)
        segment = transcriber.transformer.segment_length
        self.chunks_to_steady = math.ceil(self.full_at / segment) + 1  # the first compiled chunk included
        kwargs = {} if mode == "default" else {"mode": mode}
        self.compiled = torch.compile(full_state_view(transcriber).infer, dynamic=False, **kwargs)

    def __call__(self, input: torch.Tensor, lengths: torch.Tensor, states=None):
        if states is not None and int(states[0][3][0, 0]) >= self.full_at:
            return self.compiled(input, lengths, states)
        return self.eager(input, lengths, states)


def apply_compile(model: torch.nn.Module, config: TrialConfig) -> torch.nn.Module:
    """``torch.compile`` of the transcriber's per-chunk ``infer`` (in place), for ``config.compile != "off"``.

    A float32 encoder without memory compiles its static-shape step
    (:class:`dse.core.static_step.StaticTranscriberStep`: the same computation with no
    value-dependent shapes, so one graph without breaks serves every chunk, and one more the
    first chunk, which starts from no state); any other (int8, bf16, memory) compiles
    torchaudio's ``infer`` once for the steady state (:class:`SteadyStateCompiled`)."""
    if config.compile == "off":
        return model
    from dse.core.static_step import StaticInfer, StaticTranscriberStep

    transcriber = model.transcriber
    if isinstance(transcriber, torch.nn.Module) and hasattr(transcriber, "transformer") \
            and StaticInfer.supports(transcriber):
        kwargs = {} if config.compile == "default" else {"mode": config.compile}
        compiled = torch.compile(StaticTranscriberStep(transcriber).eval(), dynamic=False, **kwargs)
        # a plain function, not the compiled Module: nn.Module would register it as a submodule
        # named "infer", which the class's own ``infer`` method shadows
        model.transcriber.infer = lambda input, lengths, states=None: compiled(input, lengths, states)
    else:
        model.transcriber.infer = SteadyStateCompiled(transcriber, config.compile)
    return model


def deploy(model: torch.nn.Module, config: TrialConfig) -> torch.nn.Module:
    """Every ``deploy``-stage transform: the encoder's backend, precision, then compile."""
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


def torch_threads(config: TrialConfig) -> int:
    """torch's intra-op threads (OpenMP, MKL, oneDNN) for a recognizer of ``config``.

    ``config.threads``, except with an ONNX Runtime encoder: its session has ``config.threads``
    threads of its own (:func:`apply_backend`), and torch, left with the features and the
    search (matrices of a few rows), gets 1. A second OpenMP thread would spin beside ONNX
    Runtime's pool after every torch operator and take the core the encoder needs: on the
    base model at int8 and 2 threads the encoder's chunk took 12.0 ms with torch at 2
    threads and 7.0 ms at 1, and the search was no slower (a one-off comparison: two
    ``benchmarks/stream_base.py`` runs before and after this choice; the benchmark now runs only the second).
    """
    return 1 if config.backend == "onnxruntime" else config.threads


def apply_threads(config: TrialConfig) -> None:
    """torch's intra-op threads for the timed run (:func:`torch_threads`); the recognizer sets
    them again whenever it decodes, so interleaved recognizers each run with their own.

    OpenMP's wait policy cannot change once torch is loaded; it is left as the environment
    sets it, and :func:`dse.core.measure.threading_settings` records what a run used.
    """
    torch.set_num_threads(torch_threads(config))


def assemble(deployed: torch.nn.Module, logmel, tokenizer, config: TrialConfig, lm_path: Optional[str] = None,
             lm=None) -> StreamingRecognizer:
    """The streaming recognizer of a deployed module for a resolved ``config``."""
    options = {}
    for transform in transforms_at("decoder"):
        options.update(transform.function()(config, lm_path=lm_path, lm=lm))
    return StreamingRecognizer(deployed, logmel, tokenizer, config.segment_frames, config.right_context_frames,
                               dtype=DTYPES.get(config.precision, torch.float32),
                               autocast_dtype=AUTOCAST.get(config.precision), threads=torch_threads(config),
                               **options)


@contextlib.contextmanager
def _quiet_compile():
    """Compile's expected warnings (the graph breaks at torchaudio's ``.item()`` calls, no CUDA) kept
    off the console; errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def warm_compile(recognizer: StreamingRecognizer, config: TrialConfig, sample_rate: int,
                 warmup_audio: Optional[torch.Tensor] = None) -> tuple[Optional[float], Optional[int]]:
    """For a compiled configuration, stream one warm-up utterance so that compilation happens
    here: ``warmup_audio`` when it reaches the steady state (:class:`SteadyStateCompiled`), else
    silence long enough to (at least 2 s). Returns ``(seconds, graphs compiled)``, ``(None, None)``
    when not compiled."""
    if config.compile == "off":
        return None, None
    from dse.core.measure import dynamo_graphs  # here: the runtime, which never warms, does not load measure

    infer = recognizer.model.transcriber.infer
    chunks = getattr(infer, "chunks_to_steady", 1) + 1
    needed = recognizer.logmel.config.samples_for_frames(chunks * recognizer.advance_frames + recognizer.chunk_frames)
    needed = max(needed, 2 * sample_rate)
    audio = warmup_audio if warmup_audio is not None and warmup_audio.numel() >= needed else torch.zeros(needed)
    graphs = dynamo_graphs()
    t1 = time.perf_counter()
    try:
        with _quiet_compile():
            recognizer.transcribe(audio)
    except Exception as exc:
        raise TrialFailed(f"torch.compile(mode={config.compile}) failed: {type(exc).__name__}: "
                          f"{str(exc)[:500]}") from exc
    return time.perf_counter() - t1, dynamo_graphs() - graphs


def build_recognizer(loaded: LoadedModel, config: TrialConfig,
                     adapt_fn: Optional[Callable[[LoadedModel, TrialConfig], tuple[dict, dict]]] = None,
                     warmup_audio: Optional[torch.Tensor] = None) -> Built:
    """Apply every transform of ``config`` to ``loaded``; ``adapt_fn`` supplies adapted weights.

    With ``compile`` on, one warm-up utterance (``warmup_audio`` or silence, :func:`warm_compile`)
    is streamed here so that the compile time is measured as ``compile_s``, apart from
    the timed run. With ``backend=onnxruntime`` the encoder's export (or export-cache hit) is
    timed as ``export_s``, apart from ``build_s``.
    """
    t0 = time.perf_counter()
    edited = edit_architecture(loaded, config)
    cfg = config.resolved(loaded.arch)
    edited, adapt_info = apply_adaptation(edited, cfg, adapt_fn)
    deployed = deploy(edited.model, cfg)
    rec = assemble(deployed, edited.logmel(), edited.tokenizer, cfg, lm_path=edited.lm_path)
    export_info = dict(getattr(deployed.transcriber, "export_info", None) or {})
    decoder_info = export_info.get("decoder") or {}
    export_s = (export_info.get("export_s", 0.0) + export_info.get("quantize_s", 0.0)
                + decoder_info.get("export_s", 0.0) + decoder_info.get("quantize_s", 0.0)) if export_info else None
    build_s = time.perf_counter() - t0 - (export_s or 0.0)
    compile_s, graphs = warm_compile(rec, cfg, edited.features.sample_rate, warmup_audio)
    # ONNX networks hold their weights in their files
    mib = weight_mib(deployed) + (export_info.get("bytes", 0) + decoder_info.get("bytes", 0)) / 2**20
    return Built(rec, edited, cfg, sum(p.numel() for p in edited.model.parameters()), mib,
                 build_s, compile_s, adapt_info, export_s=export_s, export_info=export_info, compile_graphs=graphs)

"""The knob registry: one record per knob of the design space, grouped by the transform that applies it.

A :class:`Knob` holds every fact about one knob: its type and legal values, its default
(or the rule that fills it, as for the language-model weight), whether it can change a
transcript (``accuracy``: part of the accuracy key, so two configurations that differ
only in other knobs share one WER measurement), whether it changes the weights (``weights``:
part of the weights key; an edit the trained weights were not made for), its CLI flag and
help, and how it is shown. A :class:`Transform` owns knobs and names the function that
applies them, ``"module:function"`` (imported when a recognizer is built, so reading the
registry stays light), at one :data:`STAGES` stage of :func:`dse.core.build.build_recognizer`:

* ``architecture``: ``apply(loaded: LoadedModel, config) -> LoadedModel``, fp32 edits before
  the weights are adapted (right context, segment, MoE, mel frame);
* ``weights``: adaptation (``adapt_steps``; the build calls the study's adaptation function);
* ``deploy``: ``apply(model: nn.Module, config) -> nn.Module`` after adaptation (the encoder's
  backend, on the fp32 weights it exports from; precision; then ``torch.compile``);
* ``decoder``: ``apply(config, loaded) -> dict`` of keyword arguments of the
  :class:`~dse.core.stream.StreamingRecognizer` (beam width, LM weight, temperature);
* ``runtime``: ``apply(config) -> None`` before the timed pass (threads).

Everything that lists knobs (the :class:`~dse.core.config.TrialConfig` fields, CLI flags,
search-space validation, the accuracy and weights keys, bundle verification, the
dashboard's columns and labels) reads this registry, so adding a knob is one
:func:`register` call (or one entry in :data:`TRANSFORMS`), its apply function and tests.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

STAGES = ("architecture", "weights", "deploy", "decoder", "runtime")

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "amp-bf16", "amp-fp16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
BACKENDS = ("torch", "onnxruntime")
ONNXRUNTIME_PRECISIONS = ("fp32", "int8")  # what dse.core.onnx_encoder exports (int8: ORT dynamic quantisation)

# The beam search's temperature: the embedded default's beam search finds better
# transcripts on a flattened distribution (chosen on the adapt split; MODEL_CARD.md).
DEFAULT_TEMPERATURE = 2.0

# The shallow-fusion weight of the character language model that ships beside a
# checkpoint: the default of a beam search (beam width 2 or more) for a model that
# carries one (the embedded default does; chosen on the adapt split, MODEL_CARD.md).
# Greedy search decodes without it: on the adapt split the LM made greedy search worse.
DEFAULT_LM_WEIGHT = 0.15


def default_lm_weight(has_lm: bool, beam_width: int) -> float:
    """The LM weight a configuration gets when it does not set one."""
    return DEFAULT_LM_WEIGHT if has_lm and beam_width > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Knob:
    """One knob. ``kind``: ``"int"``, ``"float"`` or ``"str"``; legal values are ``choices``
    or the closed interval ``range``; ``nullable``: ``None`` is legal (geometry "as trained").

    ``fill``: for a knob whose default depends on the model and the other knobs,
    ``fill(values: dict, has_lm: bool) -> value`` (called when the value is unset or ``None``).
    ``fmt``: how a value is shown to people (``str`` when not given).
    ``since``: the configuration version (:data:`dse.core.config.CONFIG_VERSION`) that
    introduced the knob. A knob added after version 2 is left out of the configuration's
    content keys while it is at its default, so the keys of every configuration that could be
    written before it existed (studies' reuse keys, adaptation and export caches) stay valid.
    """
    name: str
    kind: str
    default: Any
    help: str
    choices: Optional[tuple] = None
    range: Optional[tuple] = None
    nullable: bool = False
    accuracy: bool = True
    weights: bool = False
    flag: Optional[str] = None
    fill: Optional[Callable[[dict, bool], Any]] = None
    fmt: Optional[Callable[[Any], str]] = None
    since: int = 1
    transform: str = ""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is not legal for this knob (``None`` when it is)."""
        if value is None and (self.nullable or self.fill is not None):
            return None
        if self.choices is not None:
            return None if value in self.choices else f"is not one of {', '.join(map(str, self.choices))}"
        lo, hi = self.range
        if self.kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
            return None if ok else f"must be a number in [{lo}, {hi}]"
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        return None if ok else f"must be an integer in [{lo}, {hi}]"

    def show(self, value: Any) -> str:
        return self.fmt(value) if self.fmt is not None else str(value)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A design-space transform: the knobs it owns and the function that applies them
    (``"module:function"``, or the function itself; see the module docstring for each
    stage's signature)."""
    name: str
    stage: str
    apply: "str | Callable"
    knobs: tuple[Knob, ...]
    doc: str = ""
    order: int = 50  # within a stage, lower applies first (geometry rebuilds the model before MoE edits it)

    def function(self) -> Callable:
        if callable(self.apply):
            return self.apply
        import importlib

        module, _, attr = self.apply.partition(":")
        return getattr(importlib.import_module(module), attr)


def _fill_lm_weight(values: dict, has_lm: bool) -> float:
    return default_lm_weight(has_lm, values.get("beam_width", KNOBS["beam_width"].default))


def _as_trained(value) -> str:
    return "as trained" if value is None else str(value)


def _experts(value) -> str:
    return "0 (dense)" if value == 0 else str(value)


TRANSFORMS: list[Transform] = [
    Transform("precision", "deploy", "dse.core.build:apply_precision_knob", order=10, knobs=(
        Knob("precision", "str", "fp32", "weights/activations: fp32, bf16, fp16, int8 (dynamic quantisation), "
             "or autocast amp-*", choices=PRECISIONS),
    ), doc="bf16/fp16 weights, int8 dynamic quantisation, or autocast"),
    Transform("moe", "architecture", "dse.core.build:apply_moe_knobs", order=20, knobs=(
        Knob("moe_experts", "int", 0, "experts per MoE layer; 0 = dense", range=(0, 64), weights=True, fmt=_experts),
        Knob("moe_top_k", "int", 2, "experts each frame is routed to", range=(1, 8), weights=True),
        Knob("moe_hidden", "int", 0, "expert hidden dim; 0 = the dense FFN's", range=(0, 8192), weights=True),
        Knob("moe_every", "int", 1, "MoE in every n-th layer", range=(1, 32), weights=True),
    ), doc="feed-forward blocks upcycled into mixture-of-experts blocks (dse.core.moe)"),
    Transform("geometry", "architecture", "dse.core.build:apply_geometry", order=10, knobs=(
        Knob("right_context_frames", "int", None, "right-context frames (a multiple of the time-reduction stride); "
             "default as trained", range=(0, 64), nullable=True, weights=True, flag="--right-context", fmt=_as_trained),
        Knob("segment_frames", "int", None, "segment length in frames; default as trained", range=(4, 256),
             nullable=True, weights=True, flag="--segment", fmt=_as_trained),
    ), doc="the Emformer rebuilt with another right context or segment length, same weights"),
    Transform("frontend", "architecture", "dse.core.build:apply_frontend", order=30, knobs=(
        Knob("window_samples", "int", 400, "mel window in samples at 16 kHz (default 400 = 25 ms)", range=(160, 1600),
             weights=True, flag="--window"),
        Knob("hop_samples", "int", 160, "mel hop in samples (default 160 = 10 ms)", range=(80, 800), weights=True,
             flag="--hop"),
    ), doc="mel window and hop"),
    Transform("compile", "deploy", "dse.core.build:apply_compile", order=20, knobs=(
        Knob("compile", "str", "off", "torch.compile mode for the encoder", choices=COMPILE_MODES, accuracy=False),
    ), doc="torch.compile of the transcriber's per-chunk infer (compiled kernels compute the same operations)"),
    Transform("decoder", "decoder", "dse.core.build:decoder_options", (
        Knob("beam_width", "int", 4, "decoder beam width, 1 = greedy (default 4)", range=(1, 16)),
        Knob("lm_weight", "float", 0.0,
             "character language model fused into the beam search with this weight; 0 = none. "
             f"Default {DEFAULT_LM_WEIGHT:g} for a beam search with a model that has an LM (the embedded default "
             "ships one; chosen on the adapt split), else 0 (greedy search, or a model without one; --lm gives a "
             "model one)", range=(0.0, 4.0), fill=_fill_lm_weight),
        Knob("temperature", "float", DEFAULT_TEMPERATURE,
             "divide the joint network's logits by this before the beam search's log-softmax "
             f"(default {DEFAULT_TEMPERATURE:g}, chosen on the adapt split; 1 = the model's own distribution)",
             range=(0.1, 10.0)),
    ), doc="beam width, language-model fusion weight, decoder temperature"),
    Transform("runtime", "runtime", "dse.core.build:apply_threads", (
        Knob("threads", "int", 2, "intra-op threads for the timed run (default 2)", range=(1, 256), accuracy=False),
    ), doc="threads of the timed run"),
    Transform("adapt", "weights", "dse.core.build:apply_adaptation", (
        Knob("adapt_steps", "int", 0, "fine-tuning steps on the adapt split after architecture edits",
             range=(0, 100000), weights=True),
    ), doc="fine-tuning of edited weights on the adapt split (dse.search.adapt)"),
    # Listed last, so the older knobs keep their places in CLI help and tables; applied first
    # in the deploy stage (order 5): the exporter takes the fp32 weights (ONNX Runtime
    # quantises int8 itself), then the precision transform casts or quantises what torch runs.
    Transform("backend", "deploy", "dse.core.build:apply_backend", order=5, knobs=(
        Knob("backend", "str", "torch", "what runs the encoder, predictor and joiner: torch, or onnxruntime "
             "(exported to ONNX once per weights and geometry, fp32 or int8 by --precision; their intra-op "
             "threads follow --threads); the features and the search stay in Python", choices=BACKENDS, since=3),
    ), doc="the networks' inference engine: torch, or ONNX Runtime (dse.core.onnx_encoder, dse.core.onnx_decoder); "
           "int8 ONNX Runtime quantises differently from torch's int8, so it is part of the accuracy key"),
]

KNOBS: dict[str, Knob] = {}


def _index() -> None:
    KNOBS.clear()
    for t in TRANSFORMS:
        if t.stage not in STAGES:
            raise ValueError(f"transform {t.name!r}: stage {t.stage!r} is not one of {STAGES}")
        for k in t.knobs:
            if k.name in KNOBS:
                raise ValueError(f"knob {k.name!r} is declared twice")
            KNOBS[k.name] = dataclasses.replace(k, transform=t.name)


def register(transform: Transform) -> None:
    """Add a transform and its knobs to the design space (see the module docstring)."""
    TRANSFORMS.append(transform)
    try:
        _index()
    except ValueError:
        TRANSFORMS.remove(transform)
        _index()
        raise


def unregister(name: str) -> None:
    """Remove the transform ``name`` and its knobs (tests that register a toy knob)."""
    TRANSFORMS[:] = [t for t in TRANSFORMS if t.name != name]
    _index()


def accuracy_knobs() -> tuple[str, ...]:
    """Knobs that can change a transcript (the accuracy key)."""
    return tuple(k for k, spec in KNOBS.items() if spec.accuracy)


def weight_knobs() -> tuple[str, ...]:
    """Knobs that change the weights (adaptation is keyed by them)."""
    return tuple(k for k, spec in KNOBS.items() if spec.weights)


def transforms_at(stage: str) -> list[Transform]:
    return sorted((t for t in TRANSFORMS if t.stage == stage), key=lambda t: t.order)


_index()

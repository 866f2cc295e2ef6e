"""The trial configuration: one frozen, validated dataclass that round-trips through JSON.

Each knob belongs to one transform (see :mod:`dse.transforms`), which declares its
legal values in :data:`KNOBS`; search spaces may only narrow these.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional

from dse.errors import ConfigError

CONFIG_VERSION = 2  # 2: the decoder temperature (version-1 configs decoded at 1.0)

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


def fill_lm_weight(values: dict, has_lm: bool) -> dict:
    """``values`` (knob -> value) with an unset or ``None`` ``lm_weight`` filled in by
    :func:`default_lm_weight` for its beam width."""
    if values.get("lm_weight") is not None:
        return values
    return dict(values, lm_weight=default_lm_weight(has_lm, values.get("beam_width", TrialConfig.beam_width)))

# knob -> (owning transform, legal values description, validator or choices)
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "amp-bf16", "amp-fp16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")

KNOBS: dict[str, dict[str, Any]] = {
    "precision": {"transform": "precision", "choices": PRECISIONS},
    "moe_experts": {"transform": "moe", "range": (0, 64), "doc": "0 = dense feed-forward"},
    "moe_top_k": {"transform": "moe", "range": (1, 8)},
    "moe_hidden": {"transform": "moe", "range": (0, 8192), "doc": "expert hidden dim; 0 = the dense FFN's"},
    "moe_every": {"transform": "moe", "range": (1, 32), "doc": "MoE in every n-th Emformer layer"},
    "right_context_frames": {"transform": "geometry", "range": (0, 64), "doc": "None = as trained"},
    "segment_frames": {"transform": "geometry", "range": (4, 256), "doc": "None = as trained"},
    "window_samples": {"transform": "frontend", "range": (160, 1600)},
    "hop_samples": {"transform": "frontend", "range": (80, 800)},
    "compile": {"transform": "compile", "choices": COMPILE_MODES},
    "beam_width": {"transform": "decoder", "range": (1, 16)},
    "lm_weight": {"transform": "decoder", "range": (0.0, 4.0), "kind": "float",
                  "doc": "character LM shallow-fusion weight; 0 = no LM"},
    "temperature": {"transform": "decoder", "range": (0.1, 10.0), "kind": "float",
                    "doc": "the joint network's logits are divided by it before the beam search's log-softmax"},
    "threads": {"transform": "runtime", "range": (1, 256)},
    "adapt_steps": {"transform": "adapt", "range": (0, 100000)},
}

# Knobs that can change a transcript. Threads and compile only change speed
# (compiled kernels compute the same operations), so two configurations that differ
# only in them share one accuracy measurement.
ACCURACY_KNOBS = ("precision", "moe_experts", "moe_top_k", "moe_hidden", "moe_every", "right_context_frames",
                  "segment_frames", "window_samples", "hop_samples", "beam_width", "lm_weight", "temperature", "adapt_steps")
# Knobs that change the weights (and so need adaptation when they differ from the trained model).
WEIGHT_KNOBS = ("moe_experts", "moe_top_k", "moe_hidden", "moe_every", "right_context_frames", "segment_frames",
                "window_samples", "hop_samples", "adapt_steps")


def knob_problem(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not a legal value of knob ``name`` (``None`` when it is)."""
    spec = KNOBS[name]
    if value is None and name in ("right_context_frames", "segment_frames"):
        return None
    if "choices" in spec:
        return None if value in spec["choices"] else f"is not one of {', '.join(spec['choices'])}"
    lo, hi = spec["range"]
    if spec.get("kind") == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
        return None if ok else f"must be a number in [{lo}, {hi}]"
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    return None if ok else f"must be an integer in [{lo}, {hi}]"


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """One deployment configuration. Frames are feature frames (before time reduction)."""

    precision: str = "fp32"
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_hidden: int = 0
    moe_every: int = 1
    right_context_frames: Optional[int] = None
    segment_frames: Optional[int] = None
    window_samples: int = 400
    hop_samples: int = 160
    compile: str = "off"
    beam_width: int = 4
    lm_weight: float = 0.0  # the CLI and studies fill an unset weight from default_lm_weight()
    temperature: float = DEFAULT_TEMPERATURE
    threads: int = 2
    adapt_steps: int = 0

    def __post_init__(self):
        for name in ("lm_weight", "temperature"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        for name in KNOBS:
            problem = knob_problem(name, getattr(self, name))
            if problem:
                raise ConfigError(f"{name}={getattr(self, name)!r} {problem}")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ConfigError(f"moe_top_k={self.moe_top_k} cannot exceed moe_experts={self.moe_experts}")
        if self.moe_experts == 1:
            raise ConfigError("moe_experts=1 is a dense layer with a router; use 0 (dense) or at least 2")
        if self.hop_samples > self.window_samples:
            raise ConfigError(f"hop_samples={self.hop_samples} must not exceed window_samples={self.window_samples} "
                              "(frames would skip audio)")
        if self.precision.startswith("amp") and self.compile != "off":
            raise ConfigError(f"precision={self.precision} (autocast) cannot be combined with compile={self.compile}")

    def validate_for(self, arch: dict) -> None:
        """Checks that depend on the model: stride multiples and the expert hidden dim."""
        stride = arch["time_reduction_stride"]
        for name in ("right_context_frames", "segment_frames"):
            v = getattr(self, name)
            if v is not None and v % stride:
                raise ConfigError(f"{name}={v} must be a multiple of the time-reduction stride {stride}")
        if self.segment_frames is not None and self.segment_frames < stride:
            raise ConfigError(f"segment_frames={self.segment_frames} must be at least the stride {stride}")

    def resolved(self, arch: dict) -> "TrialConfig":
        """Fill ``None`` geometry from the model's trained values."""
        return dataclasses.replace(
            self,
            right_context_frames=arch["right_context_length"] if self.right_context_frames is None else self.right_context_frames,
            segment_frames=arch["segment_length"] if self.segment_frames is None else self.segment_frames)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), version=CONFIG_VERSION)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialConfig":
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ConfigError(f"config version {version} is newer than this dse understands ({CONFIG_VERSION}); upgrade dse")
        if version < 2:
            data.setdefault("temperature", 1.0)  # what version-1 configurations were decoded with
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(sorted(unknown))}; known: {', '.join(KNOBS)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "TrialConfig":
        return cls.from_dict(json.loads(text))

    def key(self, fields=None) -> str:
        """Content hash of ``fields`` (all by default): names results determined by them."""
        d = self.to_dict()
        picked = {k: d[k] for k in (fields or sorted(d))}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def accuracy_key(self) -> str:
        return self.key(ACCURACY_KNOBS)

    def weights_key(self) -> str:
        return self.key(WEIGHT_KNOBS)

    @property
    def is_moe(self) -> bool:
        return self.moe_experts > 0


def add_config_arguments(p) -> None:
    """The knobs as CLI flags (shared by measure, run and export)."""
    d = TrialConfig()
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="weights/activations: fp32, bf16, fp16, int8 (dynamic quantisation), or autocast amp-*")
    p.add_argument("--beam-width", type=int, default=d.beam_width, help="decoder beam width, 1 = greedy (default 4)")
    p.add_argument("--lm-weight", type=float, default=None,
                   help="character language model fused into the beam search with this weight; 0 = none. "
                        f"Default {DEFAULT_LM_WEIGHT:g} for a beam search with a model that has an LM (the "
                        "embedded default ships one; chosen on the adapt split), else 0 (greedy search, or a "
                        "model without one; --lm gives a model one)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="divide the joint network's logits by this before the beam search's log-softmax "
                        f"(default {d.temperature:g}, chosen on the adapt split; 1 = the model's own distribution)")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads for the timed run (default 2)")
    p.add_argument("--right-context", type=int, dest="right_context_frames",
                   help="right-context frames (multiple of the stride 4); default as trained")
    p.add_argument("--segment", type=int, dest="segment_frames", help="segment length in frames; default as trained")
    p.add_argument("--compile", choices=COMPILE_MODES, default=d.compile, help="torch.compile mode for the encoder")
    p.add_argument("--moe-experts", type=int, default=d.moe_experts, help="experts per MoE layer; 0 = dense")
    p.add_argument("--moe-top-k", type=int, default=d.moe_top_k, help="experts each frame is routed to")
    p.add_argument("--moe-hidden", type=int, default=d.moe_hidden, help="expert hidden dim; 0 = dense FFN's")
    p.add_argument("--moe-every", type=int, default=d.moe_every, help="MoE in every n-th layer")
    p.add_argument("--window", type=int, dest="window_samples", default=d.window_samples,
                   help="mel window in samples at 16 kHz (default 400 = 25 ms)")
    p.add_argument("--hop", type=int, dest="hop_samples", default=d.hop_samples,
                   help="mel hop in samples (default 160 = 10 ms)")
    p.add_argument("--adapt-steps", type=int, default=d.adapt_steps,
                   help="fine-tuning steps on the adapt split after architecture edits")


def config_from_args(args, loaded=None) -> TrialConfig:
    """The configuration the flags ask for; an unset ``--lm-weight`` is the default
    (:func:`default_lm_weight`: it depends on whether ``loaded`` carries a language model
    and on the beam width)."""
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    values = fill_lm_weight({k: v for k, v in vars(args).items() if k in fields},
                            loaded is not None and loaded.lm_path is not None)
    cfg = TrialConfig(**values)
    if loaded is not None:
        cfg.validate_for(loaded.arch)
    return cfg

"""The trial configuration: one frozen, validated value per knob, round-tripping through JSON.

The knobs, their legal values and defaults are the registry's (:mod:`dse.core.knobs`);
search spaces may only narrow them.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from dse.core.errors import ConfigError
from dse.core.knobs import (BACKENDS, COMPILE_MODES, DEFAULT_LM_WEIGHT, DEFAULT_TEMPERATURE, KNOBS,  # noqa: F401
                            ONNXRUNTIME_PRECISIONS, PRECISIONS, accuracy_knobs, default_lm_weight,  # (re-exported)
                            weight_knobs)

# 2: the decoder temperature (version-1 configs decoded at 1.0); 3: the encoder backend
# (version-2 configs ran torch, the default).
CONFIG_VERSION = 3
# Content keys (TrialConfig.key) are those of version 2 for every configuration version 2 could
# express: a knob added later (Knob.since > KEY_BASE_VERSION) is left out while at its default.
KEY_BASE_VERSION = 2


def fill_defaults(values: dict, has_lm: bool) -> dict:
    """``values`` (knob -> value) with every unset or ``None`` knob that has a fill rule
    (:attr:`dse.core.knobs.Knob.fill`, e.g. the LM weight for its beam width) filled in."""
    out = dict(values)
    for name, spec in KNOBS.items():
        if spec.fill is not None and out.get(name) is None:
            out[name] = spec.fill(out, has_lm)
    return out


fill_lm_weight = fill_defaults  # the rule's first and still main user

def knob_problem(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not a legal value of knob ``name`` (``None`` when it is)."""
    return KNOBS[name].problem(value)


class TrialConfig:
    """One deployment configuration: a frozen, validated value for every knob of
    :data:`dse.core.knobs.KNOBS`. Frames are feature frames (before time reduction).

    ``TrialConfig(precision="int8")`` takes any knobs by name (the others take their
    defaults); ``config.precision`` reads one; :meth:`replace` makes a changed copy.
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any):
        unknown = set(values) - set(KNOBS)
        if unknown:
            raise ConfigError(f"unknown knob(s) {', '.join(sorted(unknown))}; known: {', '.join(KNOBS)}")
        resolved = {}
        for name, spec in KNOBS.items():
            value = values.get(name, spec.default)
            if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            resolved[name] = value
        object.__setattr__(self, "_values", resolved)
        self._check()

    def __getattr__(self, name: str) -> Any:
        if name == "_values":
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"TrialConfig has no knob {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("TrialConfig is frozen; use config.replace(...)")

    def __eq__(self, other) -> bool:
        return isinstance(other, TrialConfig) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return "TrialConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __reduce__(self):
        return (_config_from_values, (dict(self._values),))

    def replace(self, **changes: Any) -> "TrialConfig":
        return TrialConfig(**dict(self._values, **changes))

    def _check(self) -> None:
        for name, spec in KNOBS.items():
            value = self._values[name]
            problem = None if (value is None and spec.nullable) else spec.problem(value)
            if value is None and not spec.nullable:
                problem = "must be set"
            if problem:
                raise ConfigError(f"{name}={value!r} {problem}")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ConfigError(f"moe_top_k={self.moe_top_k} cannot exceed moe_experts={self.moe_experts}")
        if self.moe_experts == 1:
            raise ConfigError("moe_experts=1 is a dense layer with a router; use 0 (dense) or at least 2")
        if self.hop_samples > self.window_samples:
            raise ConfigError(f"hop_samples={self.hop_samples} must not exceed window_samples={self.window_samples} "
                              "(frames would skip audio)")
        if self.precision.startswith("amp") and self.compile != "off":
            raise ConfigError(f"precision={self.precision} (autocast) cannot be combined with compile={self.compile}")
        if self.backend == "onnxruntime":
            if self.precision not in ONNXRUNTIME_PRECISIONS:
                raise ConfigError(f"precision {self.precision} is not available with backend onnxruntime; "
                                  f"use {' or '.join(ONNXRUNTIME_PRECISIONS)}")
            if self.compile != "off":
                raise ConfigError(f"compile {self.compile} is not available with backend onnxruntime (torch.compile "
                                  "compiles torch's encoder; ONNX Runtime optimises its own graph); use compile off")

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
        return self.replace(
            right_context_frames=arch["right_context_length"] if self.right_context_frames is None else self.right_context_frames,
            segment_frames=arch["segment_length"] if self.segment_frames is None else self.segment_frames)

    def to_dict(self) -> dict:
        return dict(self._values, version=CONFIG_VERSION)

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
        unknown = set(data) - set(KNOBS)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(sorted(unknown))}; known: {', '.join(KNOBS)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "TrialConfig":
        return cls.from_dict(json.loads(text))

    def key_values(self) -> dict:
        """What the content keys hash: the values with every knob introduced after config version
        :data:`KEY_BASE_VERSION` left out while it is at its default (``Knob.since``), and as
        ``version`` the oldest configuration version that expresses them. A configuration that
        version 2 could express therefore keeps the key it had then (``TrialConfig().key()``
        included), so studies' reuse keys and the adaptation and export caches stay valid."""
        out, version = {}, KEY_BASE_VERSION
        for name, value in self._values.items():
            spec = KNOBS[name]
            if spec.since > KEY_BASE_VERSION:
                if value == spec.default:
                    continue
                version = max(version, spec.since)
            out[name] = value
        out["version"] = version
        return out

    def key(self, fields=None) -> str:
        """Content hash of ``fields`` (all by default): names results determined by them
        (see :meth:`key_values` for which values take part)."""
        d = self.key_values()
        picked = {k: d[k] for k in (fields or sorted(d)) if k in d}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def accuracy_key(self) -> str:
        return self.key(accuracy_knobs())

    def weights_key(self) -> str:
        return self.key(weight_knobs())

    @property
    def is_moe(self) -> bool:
        return self.moe_experts > 0


def add_config_arguments(p) -> None:
    """The knobs as CLI flags (shared by measure, run and export), one per registered knob."""
    for name, spec in KNOBS.items():
        kwargs: dict = {"dest": name, "help": spec.help}
        if spec.choices is not None:
            kwargs["choices"] = spec.choices
        else:
            kwargs["type"] = float if spec.kind == "float" else int
        kwargs["default"] = None if spec.fill is not None else spec.default
        p.add_argument(spec.cli_flag, **kwargs)


def config_from_args(args, loaded=None) -> TrialConfig:
    """The configuration the flags ask for; unset knobs with a fill rule take their default
    (:func:`fill_defaults`: the LM weight depends on whether ``loaded`` carries a language
    model and on the beam width)."""
    values = fill_defaults({k: v for k, v in vars(args).items() if k in KNOBS},
                           loaded is not None and loaded.lm_path is not None)
    cfg = TrialConfig(**values)
    if loaded is not None:
        cfg.validate_for(loaded.arch)
    return cfg


def _config_from_values(values: dict) -> TrialConfig:
    return TrialConfig(**values)

"""Search spaces as data: ``search_spaces/<name>.yaml``.

A space selects and narrows the knobs of :data:`dse.core.knobs.KNOBS`; it never invents
one. Format::

    description: what the study asks
    model: default            # default | base-random | <architecture>-random | <checkpoint path>
    sampler: gp               # gp (default) | tpe | nsga2 | random | grid
    n_trials: 6               # the study's default trial count
    timeout: 360              # optional: seconds after which no new trial starts (a run's time budget)
    objectives:               # each: a metric and a direction
      - {metric: wer, direction: minimize}
      - {metric: rtf_p95, direction: minimize}
    constraints:              # each: a metric and a bound (max and/or min); infeasible trials stay recorded
      - {metric: ttft_s, max: 0.5}
    fixed: {beam_width: 4}    # knobs held at one value
    params:                   # knobs searched: choices, or an integer range
      precision: {choices: [fp32, int8]}
      moe_experts: {choices: [0, 4, 8]}
      adapt_steps: {low: 0, high: 300, step: 100}
    anchors:                  # known configurations enqueued right after the baseline (once per study)
      - {precision: int8}
    remeasure: {pairs: 3, utterances: 8}   # front pairs the noise leaves open, re-timed against each other
    prune:                    # the project's own early stop for adaptation
      wer_above: 0.95         # abandon when the dev WER is above this at a check
      front_margin: 0.05      # ... or when a front member at least as fast is ahead on the same dev
                              # measurement by more than this plus the paired noise

Knobs left out take :class:`~dse.core.config.TrialConfig`'s defaults. MoE sub-knobs are
set to their defaults when ``moe_experts`` is 0, so dense trials share one identity.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from dse.core.config import TrialConfig, fill_defaults, knob_problem
from dse.core.knobs import KNOBS, weight_knobs
from dse.core.record import METRIC_DOCS
from dse.core.errors import ConfigError

SPACES_DIR = Path(__file__).resolve().parent.parent.parent / "search_spaces"
METRICS = METRIC_DOCS  # the metrics a space may name, from the one metric registry
DIRECTIONS = ("minimize", "maximize")
LEVEL_SUFFIX = "_level"   # Optuna parameter name of an ordered knob's level index
SAMPLERS = ("gp", "tpe", "nsga2", "random", "grid")
TOP_KEYS = {"description", "model", "sampler", "n_trials", "objectives", "constraints", "fixed", "params",
            "prune", "baseline", "timing_utterances", "eval_limit", "anchors", "remeasure", "timeout"}


@dataclasses.dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclasses.dataclass(frozen=True)
class Constraint:
    metric: str
    max: Optional[float] = None
    min: Optional[float] = None

    def violation(self, value: Optional[float]) -> float:
        """Optuna's convention: <= 0 is feasible. A missing value violates by 1."""
        if value is None:
            return 1.0
        v = -float("inf")
        if self.max is not None:
            v = max(v, value - self.max)
        if self.min is not None:
            v = max(v, self.min - value)
        return v


@dataclasses.dataclass(frozen=True)
class Param:
    knob: str
    choices: Optional[tuple] = None
    low: Optional[int] = None
    high: Optional[int] = None
    step: int = 1

    def values(self) -> list:
        return list(self.choices) if self.choices is not None else list(range(self.low, self.high + 1, self.step))

    @property
    def ordered(self) -> bool:
        """Numeric choices are ordered levels, not unrelated categories (see :meth:`Space.suggest`)."""
        return self.choices is not None and all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.choices)

    @property
    def level_name(self) -> str:
        return f"{self.knob}{LEVEL_SUFFIX}"

    def as_level(self, levels: bool) -> bool:
        """Whether :meth:`Space.suggest` asks Optuna for a level (an ordered knob, with ``levels``)."""
        return levels and self.ordered

    def optuna_name(self, levels: bool) -> str:
        """The name of this knob's parameter in an Optuna trial."""
        return self.level_name if self.as_level(levels) else self.knob


@dataclasses.dataclass(frozen=True)
class Space:
    name: str
    path: Path
    description: str
    model: str
    sampler: str
    n_trials: int
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    fixed: dict
    params: tuple[Param, ...]
    prune: dict
    baseline: dict
    timing_utterances: int
    eval_limit: Optional[int]
    anchors: tuple = ()      # known configurations (knob -> value over ``fixed``) enqueued after the baseline
    remeasure: dict = dataclasses.field(default_factory=lambda: {"pairs": 3, "utterances": 8})
    timeout: Optional[float] = None  # seconds after which a run starts no new trial (None: no budget)
    has_lm: bool = False  # whether the model carries a language model (for_model)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def suggest(self, trial, levels: bool = True) -> TrialConfig:
        """Sample a configuration on an Optuna trial.

        Numeric choices (beam width 1/2/4/8, right context 0/4/8, ...) are ordered: with
        ``levels`` they are suggested as an integer level ``<knob>_level`` (0 = smallest
        value), so a model-based sampler (GP, TPE) learns that neighbouring values behave
        alike; as unordered categories it cannot (``benchmarks/search_efficiency.py``
        measures both).
        The value used is in the trial's ``config`` user attribute. ``levels=False``
        suggests every choice list as categories under the knob's own name (the grid
        sampler needs that).
        """
        values = dict(self.fixed)
        for p in self.params:
            if p.as_level(levels):
                ordered = sorted(p.choices)
                values[p.knob] = ordered[trial.suggest_int(p.level_name, 0, len(ordered) - 1)]
            elif p.choices is not None:
                values[p.knob] = trial.suggest_categorical(p.knob, list(p.choices))
            else:
                values[p.knob] = trial.suggest_int(p.knob, p.low, p.high, step=p.step)
        return self._filled(values)

    def params_for(self, config: TrialConfig, levels: bool = True) -> Optional[dict]:
        """The Optuna parameters under which :meth:`suggest` gives ``config`` (so that an enqueued
        configuration is a regular point for the sampler), or ``None`` when it is not in the
        space. A knob whose value ``config``'s canonical form ignores (a MoE sub-knob of a
        dense model) takes its first value."""
        params, values = {}, dict(self.fixed)
        for p in self.params:
            level = p.as_level(levels)
            ordered = sorted(p.values()) if level else p.values()
            mine = getattr(config, p.knob)
            value = mine if mine in ordered else ordered[0]
            values[p.knob] = value
            params[p.optuna_name(levels)] = ordered.index(value) if level else value
        try:
            return params if self._filled(values) == config else None
        except ConfigError:
            return None

    def configurations(self) -> list[TrialConfig]:
        """Every distinct configuration of the space (canonical forms, each once), in grid order."""
        import itertools

        seen, out = set(), []
        names = [p.knob for p in self.params]
        for combo in itertools.product(*(p.values() for p in self.params)):
            try:
                cfg = self._filled(dict(self.fixed, **dict(zip(names, combo))))
            except ConfigError:
                continue
            if cfg.key() not in seen:
                seen.add(cfg.key())
                out.append(cfg)
        return out

    def random_configuration(self, rng) -> Optional[TrialConfig]:
        """One point of the space drawn uniformly (``None`` when the drawn values do not make a
        valid configuration)."""
        try:
            return self._filled(dict(self.fixed, **{p.knob: rng.choice(p.values()) for p in self.params}))
        except ConfigError:
            return None

    def anchor_configs(self) -> list[TrialConfig]:
        """The space's anchors (each over ``fixed``, like a sampled configuration)."""
        return [self._filled(dict(self.fixed, **a)) for a in self.anchors]

    def check_for(self, arch: dict, has_lm: bool) -> None:
        """Every value the space can give, checked against the model it will run on before any
        trial: a value no trial could run with is an error naming the file, the key and the fix."""
        from dse.core.build import moe_spec

        space = self.for_model(has_lm)
        experts = max([v for p in self.params if p.knob == "moe_experts" for v in p.values()]
                      + [self.fixed.get("moe_experts", 0)])
        checks = [("baseline", lambda: space.baseline_config())]
        checks += [(f"anchors[{i}]", lambda a=a: space._filled(dict(self.fixed, **a))) for i, a in enumerate(self.anchors)]
        for p in self.params:
            for v in p.values():
                extra = {"moe_experts": experts} if p.knob.startswith("moe_") and p.knob != "moe_experts" else {}
                checks.append((f"params.{p.knob}: {v!r}", lambda p=p, v=v, extra=extra:
                               space._filled(dict(self.fixed, **extra, **{p.knob: v}))))
        for key, make in checks:
            try:
                cfg = make()
                cfg.validate_for(arch)
                moe_spec(arch, cfg.resolved(arch))
                if cfg.lm_weight > 0 and not has_lm:
                    raise ConfigError(f"lm_weight={cfg.lm_weight:g} needs a language model and this model has none "
                                      "(use --lm FILE, or lm_weight 0)")
            except ConfigError as exc:
                raise _err(self.path, key, f"{exc}; change it in the space file") from None

    def check_weights(self, model: str, trained: bool, can_adapt: bool) -> None:
        """What random weights cannot give, refused before any trial: a word error rate to search
        on or to limit, and adaptation (``can_adapt``: trained weights and an adaptation split)."""
        if not trained:
            named = [(f"objectives[{i}]", o.metric) for i, o in enumerate(self.objectives)]
            named += [(f"constraints[{i}]", c.metric) for i, c in enumerate(self.constraints)]
            for key, metric in named:
                if metric in ("wer", "cer"):
                    raise _err(self.path, key, f"{metric}: {model} has random weights, whose {metric.upper()} is not "
                                               "measured; use trained weights (model: default, or a checkpoint) or "
                                               "speed metrics only (rtf_p95, ttft_s, ...)")
        for key, steps in self._adapt_steps():
            if steps and not can_adapt:
                why = "has random weights" if not trained else "has no adaptation split (--adapt-set)"
                raise _err(self.path, key, f"adapting needs trained weights and an adaptation split, and {model} "
                                           f"{why}; set adapt_steps 0")

    def _adapt_steps(self) -> list[tuple[str, int]]:
        """(where in the file, adapt_steps) for every value the space can give."""
        steps = [("fixed.adapt_steps", self.fixed.get("adapt_steps", 0))]
        steps += [(f"params.adapt_steps: {v!r}", v) for p in self.params if p.knob == "adapt_steps" for v in p.values()]
        steps += [(f"anchors[{i}].adapt_steps", a.get("adapt_steps", 0)) for i, a in enumerate(self.anchors)]
        return steps

    def adapts(self) -> bool:
        """Whether some trial of this space adapts its weights."""
        return any(steps for _, steps in self._adapt_steps())

    def grid(self) -> dict[str, list]:
        return {p.knob: p.values() for p in self.params}

    def grid_size(self) -> int:
        n = 1
        for p in self.params:
            n *= len(p.values())
        return n

    def for_model(self, has_lm: bool) -> "Space":
        """This space for a model that does (or does not) carry a language model: where the
        space sets no ``lm_weight`` (neither fixed, sampled nor in its baseline), each
        configuration gets :func:`~dse.core.config.fill_defaults`'s default for its beam width."""
        return dataclasses.replace(self, has_lm=has_lm)

    def _filled(self, values: dict) -> TrialConfig:
        return canonical(fill_defaults(values, self.has_lm))

    def baseline_config(self) -> TrialConfig:
        """The configuration every trial is timed against: the space's ``baseline`` over its
        ``fixed`` knobs, minus fixed knobs that change the weights (the baseline is the
        model as trained unless ``baseline`` says otherwise)."""
        fixed = {k: v for k, v in self.fixed.items() if k not in weight_knobs()}
        return self._filled(dict(fixed, **self.baseline))


def canonical(values: dict) -> TrialConfig:
    """A TrialConfig with knobs that have no effect reset to defaults (dense => no MoE sub-knobs)."""
    values = dict(values)
    if values.get("moe_experts", 0) == 0:
        d = TrialConfig()
        for k in ("moe_top_k", "moe_hidden", "moe_every"):
            values[k] = getattr(d, k)
    elif values.get("moe_top_k", 2) > values["moe_experts"]:
        values["moe_top_k"] = values["moe_experts"]
    return TrialConfig(**values)


def _err(path, key, msg) -> ConfigError:
    return ConfigError(f"{path}: {key}: {msg}")


def _check_knob_value(path, knob, value, section: str = "params"):
    problem = knob_problem(knob, value)
    if problem:
        raise _err(path, f"{section}.{knob}", f"{value!r} {problem}")


def parse_space(data: Any, path: Path, name: Optional[str] = None) -> Space:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise _err(path, ", ".join(sorted(unknown)), f"unknown key; allowed keys: {', '.join(sorted(TOP_KEYS))}")
    sampler = data.get("sampler", "gp")
    if sampler not in SAMPLERS:
        raise _err(path, "sampler", f"{sampler!r} is not one of {', '.join(SAMPLERS)}")
    objectives = []
    for i, o in enumerate(data.get("objectives") or []):
        if not isinstance(o, dict) or o.get("metric") not in METRICS:
            raise _err(path, f"objectives[{i}].metric", f"{(o or {}).get('metric')!r} is not a metric; allowed: {', '.join(METRICS)}")
        if o.get("direction") not in DIRECTIONS:
            raise _err(path, f"objectives[{i}].direction", f"{o.get('direction')!r} must be minimize or maximize")
        objectives.append(Objective(o["metric"], o["direction"]))
    if not objectives:
        raise _err(path, "objectives", "at least one objective is required")
    constraints = []
    for i, c in enumerate(data.get("constraints") or []):
        if not isinstance(c, dict) or c.get("metric") not in METRICS:
            raise _err(path, f"constraints[{i}].metric", f"{(c or {}).get('metric')!r} is not a metric; allowed: {', '.join(METRICS)}")
        if c.get("max") is None and c.get("min") is None:
            raise _err(path, f"constraints[{i}]", "needs a max or a min")
        constraints.append(Constraint(c["metric"], c.get("max"), c.get("min")))
    fixed = dict(data.get("fixed") or {})
    params = []
    for knob, spec in (data.get("params") or {}).items():
        if knob not in KNOBS:
            raise _err(path, f"params.{knob}", f"unknown knob; allowed knobs: {', '.join(KNOBS)}")
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise _err(path, f"params.{knob}", "needs 'choices: [...]' or 'low' and 'high' (and optional 'step')")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise _err(path, f"params.{knob}.choices", "must be a non-empty list")
            for v in spec["choices"]:
                _check_knob_value(path, knob, v)
            params.append(Param(knob, choices=tuple(spec["choices"])))
        else:
            if KNOBS[knob].kind == "float":
                raise _err(path, f"params.{knob}", "a real-valued knob is searched over a list: 'choices: [...]'")
            for v in (spec["low"], spec["high"]):
                _check_knob_value(path, knob, v)
            step = spec.get("step", 1)
            if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
                raise _err(path, f"params.{knob}.step", f"{step!r} must be a positive integer")
            if spec["low"] > spec["high"]:
                raise _err(path, f"params.{knob}", f"low {spec['low']} is above high {spec['high']}; swap them")
            params.append(Param(knob, low=spec["low"], high=spec["high"], step=step))
    for knob, v in fixed.items():
        if knob not in KNOBS:
            raise _err(path, f"fixed.{knob}", f"unknown knob; allowed knobs: {', '.join(KNOBS)}")
        _check_knob_value(path, knob, v, "fixed")
    baseline = dict(data.get("baseline") or {})
    for knob in baseline:
        if knob not in KNOBS:
            raise _err(path, f"baseline.{knob}", f"unknown knob; allowed knobs: {', '.join(KNOBS)}")
    try:
        canonical(dict({k: v for k, v in fixed.items() if k not in weight_knobs()}, **baseline))
    except ConfigError as exc:
        raise _err(path, "fixed/baseline", str(exc)) from None
    anchors = data.get("anchors") or []
    if not isinstance(anchors, list) or not all(isinstance(a, dict) for a in anchors):
        raise _err(path, "anchors", "must be a list of mappings knob: value")
    for i, a in enumerate(anchors):
        for knob, v in a.items():
            if knob not in KNOBS:
                raise _err(path, f"anchors[{i}].{knob}", f"unknown knob; allowed knobs: {', '.join(KNOBS)}")
            _check_knob_value(path, knob, v, f"anchors[{i}]")
        try:
            canonical(dict(fixed, **a))
        except ConfigError as exc:
            raise _err(path, f"anchors[{i}]", str(exc)) from None
    remeasure = dict({"pairs": 3, "utterances": 8}, **(data.get("remeasure") or {}))
    counts = {"n_trials": data.get("n_trials", 10), "timing_utterances": data.get("timing_utterances", 24),
              "remeasure.pairs": remeasure["pairs"], "remeasure.utterances": remeasure["utterances"]}
    for key, v in counts.items():
        least = 1 if key == "timing_utterances" else 0  # a trial is timed on at least one utterance
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise _err(path, key, f"{v!r} must be a whole number ({least} or more)")
    eval_limit = data.get("eval_limit")
    if eval_limit is not None and (not isinstance(eval_limit, int) or isinstance(eval_limit, bool) or eval_limit < 1):
        raise _err(path, "eval_limit", f"{eval_limit!r} must be a whole number of utterances (1 or more)")
    timeout = data.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise _err(path, "timeout", f"{timeout!r} must be a positive number of seconds")
    return Space(name=name or path.stem, path=path, description=str(data.get("description", "")),
                 model=str(data.get("model", "default")), sampler=sampler, n_trials=counts["n_trials"],
                 objectives=tuple(objectives), constraints=tuple(constraints), fixed=fixed, params=tuple(params),
                 prune=dict(data.get("prune") or {}), baseline=baseline,
                 timing_utterances=counts["timing_utterances"], eval_limit=data.get("eval_limit"),
                 anchors=tuple(anchors), remeasure=remeasure,
                 timeout=float(timeout) if timeout is not None else None)


def load_space(name_or_path: str) -> Space:
    """A space by name (``search_spaces/<name>.yaml``) or by path."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(f"no search space {name_or_path!r} ({path} not found); known: {', '.join(known)}")
    if path.is_dir():
        raise ConfigError(f"search space {path} is a directory; give a YAML file or a name in {SPACES_DIR}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    return parse_space(data, path)

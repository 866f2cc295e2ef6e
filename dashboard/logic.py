"""Plain functions behind the study dashboard: trial rows, Pareto fronts, limits, the recommendation.

Nothing here imports Streamlit or Plotly. Studies are read through Optuna's API only.

Vocabulary:

* a *row* is one COMPLETE trial in a :class:`pandas.DataFrame` built by :func:`trial_rows`:
  ``trial`` (the Optuna trial number), ``study``, one column per knob of
  :data:`dse.core.knobs.KNOBS` (raw values, ``None`` for geometry "as trained"), one float
  column per metric of :data:`METRICS` (NaN where the metric was not measured, e.g. WER
  with random weights), ``config`` (the stored config dict) and ``attrs`` (all the
  trial's ``user_attrs``);
* a *speed axis* is a row column to minimise (:data:`SPEED_AXES`), an *accuracy axis*
  is ``wer`` or ``cer`` (fractions, minimised);
* :class:`Limits` are the upper bounds a shippable trial must meet.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

import pandas as pd

from dse.core.knobs import KNOBS
from dse.core.record import METRICS, TrialRecord


SPEED_AXES: tuple[str, ...] = ("rtf_p95", "rtf_p50", "rtf_normalised", "inverse_speedup", "chunk_latency_p95_ms",
                               "ttft_s", "weight_mib")
ACCURACY_AXES: tuple[str, ...] = ("wer", "cer")
KEY_METRICS: tuple[str, ...] = ("wer", "cer", "rtf_p95", "rtf_normalised", "speedup", "chunk_latency_p95_ms",
                                "ttft_s", "weight_mib")
UNITS = {"percent": "%", "ratio": "", "ms": "ms", "s": "s", "mib": "MiB", "count": "", "flops": "FLOPs",
         "factor": "×"}


def axis_title(metric: str) -> str:
    """Axis title with its unit, e.g. ``"chunk p95 (ms)"``, ``"WER (%)"``."""
    m = METRICS[metric]
    unit = UNITS[m.kind] if m.kind != "ratio" else ""
    return f"{m.label} ({unit})" if unit else m.label


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


_FORMATS = {
    "percent": lambda v: f"{100 * v:.1f} %",
    "ratio": lambda v: f"{v:.3f}",
    "factor": lambda v: f"{v:.2f}×",
    "ms": lambda v: f"{v:.1f} ms",
    "s": lambda v: f"{v:.3f} s",
    "mib": lambda v: f"{v:.1f} MiB",
    "flops": lambda v: f"{v / 1e6:,.2f} MFLOPs",
}


def format_metric(metric: str, value: Any) -> str:
    """``value`` of ``metric`` for people: ``"12.3 %"``, ``"0.118"``, ``"41.2 ms"``; missing -> ``"not measured"``."""
    m = METRICS[metric]
    if is_missing(value):
        return m.missing
    return _FORMATS.get(m.kind, "{:,.0f}".format)(float(value))


def change_from(metric: str, value: Any, reference: Any) -> Optional[str]:
    """``value`` against ``reference``: ``"+1.5 pts"`` for WER/CER, ``"-42%"`` otherwise; None when
    either is missing."""
    if is_missing(value) or is_missing(reference):
        return None
    if METRICS[metric].kind == "percent":
        return f"{100 * (float(value) - float(reference)):+.1f} pts"
    return f"{(float(value) - float(reference)) / float(reference):+.0%}" if reference else None


def format_knob(knob: str, value: Any) -> str:
    """A knob value for people: geometry ``None`` reads "as trained", dense MoE reads "dense"."""
    spec = KNOBS.get(knob)
    return spec.show(value) if spec is not None else str(value)


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _config_knobs(config: Optional[dict]) -> dict[str, Any]:
    """The knob entries of a config (or Optuna params) dict, in :data:`KNOBS` order."""
    return {k: config[k] for k in KNOBS if k in (config or {})}


def trial_rows(trials: Iterable, study_name: str = "") -> pd.DataFrame:
    """One row per COMPLETE trial (see the module docstring), ordered by trial number.

    ``trials``: Optuna ``FrozenTrial`` objects (any state; only COMPLETE ones become rows).
    ``inverse_speedup`` is derived as ``1 / speedup`` (NaN when the speedup is missing or <= 0).
    """
    from optuna.trial import TrialState

    records = []
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        attrs = dict(t.user_attrs)
        result = TrialRecord.from_user_attrs(attrs)
        config = dict(result.config or {})
        metrics = result.metrics or {}
        record: dict[str, Any] = {"trial": t.number, "study": study_name}
        record.update({k: config.get(k) for k in KNOBS})
        record.update({name: _float(metrics.get(name)) for name in METRICS})
        speedup = record["speedup"]
        record["inverse_speedup"] = 1.0 / speedup if speedup > 0 else float("nan")
        record["config"] = config
        record["attrs"] = attrs
        records.append(record)
    columns = ["trial", "study", *KNOBS, *METRICS, "config", "attrs"]
    rows = pd.DataFrame(records, columns=columns)
    for knob in KNOBS:  # keep ints ints and "as trained" None
        rows[knob] = pd.Series([r[knob] for r in records], dtype=object, index=rows.index)
    for name in METRICS:
        rows[name] = rows[name].astype(float)
    rows["trial"] = rows["trial"].astype(int)
    return rows.sort_values("trial").reset_index(drop=True)


def pareto_mask(x: Sequence[float], y: Sequence[float]) -> list[bool]:
    """Which points are on the Pareto front when both ``x`` and ``y`` are minimised.

    A point is on the front when no other point is at least as good in both and strictly
    better in one; exact duplicates of a front point are on the front too. Points with a
    missing (NaN or None) coordinate are never on it. O(n log n).
    """
    points = [(float(a), float(b), i) for i, (a, b) in enumerate(zip(x, y))
              if not is_missing(a) and not is_missing(b)]
    points.sort()
    on_front = [False] * len(x)
    best_y_left = math.inf  # the lowest y among points with a strictly smaller x
    i = 0
    while i < len(points):
        j = i
        while j < len(points) and points[j][0] == points[i][0]:
            j += 1
        group_min_y = points[i][1]  # sorted by y inside an x group
        if group_min_y < best_y_left:
            for _, py, index in points[i:j]:
                if py == group_min_y:
                    on_front[index] = True
        best_y_left = min(best_y_left, group_min_y)
        i = j
    return on_front


def pareto_front(rows: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows on the Pareto front of columns ``x`` and ``y`` (both minimised), ordered by ``x``."""
    mask = pareto_mask(rows[x].tolist(), rows[y].tolist())
    return rows[mask].sort_values([x, y, "trial"])


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upper bounds a shippable trial must meet; ``None`` means no limit.

    ``max_wer`` is a fraction (0.15 = 15 %), ``max_ttft_s`` in seconds, ``max_weight_mib``
    in MiB. A trial whose bounded metric was not measured does not meet the bound.
    """
    max_wer: Optional[float] = None
    max_ttft_s: Optional[float] = None
    max_weight_mib: Optional[float] = None

    def bounds(self) -> dict[str, float]:
        """Row column -> upper bound, for the limits that are set."""
        pairs = {"wer": self.max_wer, "ttft_s": self.max_ttft_s, "weight_mib": self.max_weight_mib}
        return {metric: bound for metric, bound in pairs.items() if bound is not None}


def feasible_mask(rows: pd.DataFrame, limits: Limits) -> pd.Series:
    """True for rows that meet every set limit (a missing metric under a limit fails it)."""
    mask = pd.Series(True, index=rows.index)
    for metric, bound in limits.bounds().items():
        mask &= rows[metric].notna() & (rows[metric] <= bound)
    return mask


def excluded_by_limit(rows: pd.DataFrame, limits: Limits) -> dict[str, int]:
    """For each set limit, how many rows it rules out on its own (not measured included)."""
    return {metric: int((~(rows[metric].notna() & (rows[metric] <= bound))).sum())
            for metric, bound in limits.bounds().items()}


def recommend(rows: pd.DataFrame, speed: str, limits: Limits, baselines: Sequence[int] = (),
              pair_speedups: Optional[dict] = None) -> Optional[int]:
    """The trial number to ship: the lowest ``speed`` among rows within ``limits``.

    Ties go to the lower WER (a measured WER before a missing one), then to the lower trial
    number. ``None`` when no row meets the limits with a measured ``speed``.

    With a baseline trial (``baselines``), the recommendation is never one the baseline
    dominates: a trial qualifies only if it is faster than the baseline beyond the timing
    noise and the baseline does not dominate it beyond noise (:mod:`dse.search.front`); when
    none qualifies, the baseline itself is recommended. A baseline outside the limits cannot
    be shipped, so it then rules nothing out.
    """
    candidates = rows[feasible_mask(rows, limits) & rows[speed].notna()]
    if candidates.empty:
        return None
    ordered = candidates.sort_values([speed, "wer", "trial"], na_position="last")
    base = baselines[0] if baselines else None
    if base is None or base not in set(candidates["trial"]):  # no baseline, or one outside the limits
        return int(ordered["trial"].iloc[0])
    for number in ordered["trial"]:
        if int(number) == base or beats_baseline(rows, int(number), base, pair_speedups):
            return int(number)
    return base


def _records(rows: pd.DataFrame) -> list[TrialRecord]:
    """The :class:`TrialRecord` of each row, in row order."""
    return [TrialRecord.from_user_attrs(a) for a in rows["attrs"]]


def _points(rows: pd.DataFrame, baseline: Optional[int]) -> dict:
    from dse.search.front import point_from_record

    return {int(n): point_from_record(int(n), r, baseline) for n, r in zip(rows["trial"], _records(rows))}


def beats_baseline(rows: pd.DataFrame, trial: int, baseline: int, pair_speedups: Optional[dict] = None) -> bool:
    """Faster than the baseline beyond noise, and not dominated by it beyond noise."""
    from dse.search.front import beats

    points = _points(rows[rows["trial"].isin([trial, baseline])], baseline)
    return beats(points[trial], points[baseline], pair_speedups)


def against_baseline(rows: pd.DataFrame, trial: int, baseline: int, pair_speedups: Optional[dict] = None) -> str:
    """``trial``'s speedup and WER difference against the baseline, each with its interval, in words."""
    from dse.search.front import compare, describe_against_baseline

    points = _points(rows[rows["trial"].isin([trial, baseline])], baseline)
    return describe_against_baseline(compare(points[trial], points[baseline], pair_speedups), f"Trial {trial}")


def undecided_trials(rows: pd.DataFrame, baseline: Optional[int], pair_speedups: Optional[dict] = None) -> list[int]:
    """Trials another trial nominally dominates but not beyond the noise (:func:`dse.search.front.noisy_front`)."""
    from dse.search.front import noisy_front, point_from_record

    points = {int(n): point_from_record(int(n), r, baseline) for n, r in zip(rows["trial"], _records(rows))
              if (r.speedup or {}).get("speedup")}
    if not points:
        return []
    front = noisy_front(list(points.values()), pair_speedups)
    return sorted({b for _, b in front.undecided})


def error_bar(rows: pd.DataFrame, metric: str) -> Optional[tuple[list, list]]:
    """(minus, plus) distances of each row's 95 % interval on ``metric``, where the study keeps one:
    WER (bootstrap over utterances), mean RTF, and the speed axes derived from the same-run
    speedup (its interval); ``None`` for metrics without one."""
    def spans(values, intervals):
        minus, plus = [], []
        for v, ci in zip(values, intervals):
            ok = ci is not None and not is_missing(v)
            minus.append(max(0.0, v - ci[0]) if ok else 0.0)
            plus.append(max(0.0, ci[1] - v) if ok else 0.0)
        return minus, plus

    records = _records(rows)
    if metric == "wer":
        return spans(rows["wer"], [r.wer_ci95 for r in records])
    if metric == "rtf_mean":
        return spans(rows["rtf_mean"], [r.rtf_mean_ci95 for r in records])
    if metric in ("rtf_normalised", "inverse_speedup"):
        out = []
        for v, r in zip(rows[metric], records):
            ratio = r.speedup or {}
            ci, sp = ratio.get("speedup_ci95"), ratio.get("speedup")
            out.append(None if not ci or not sp or is_missing(v) else (v * sp / ci[1], v * sp / ci[0]))
        return spans(rows[metric], out)
    return None


@dataclasses.dataclass(frozen=True)
class TrialCounts:
    """How many trials a study holds in each state."""
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def total(self) -> int:
        return self.complete + self.pruned + self.failed + self.running + self.waiting

    def describe(self) -> str:
        """E.g. ``"50 trials: 44 complete, 3 pruned, 2 failed, 1 running"`` (zero counts left out)."""
        parts = [f"{n} {name}" for name, n in dataclasses.asdict(self).items() if n and name != "complete"]
        head = f"{self.total} trial{'s' if self.total != 1 else ''}: {self.complete} complete"
        return ", ".join([head, *parts])


def count_states(trials: Iterable) -> TrialCounts:
    """Trials per state; FAIL counts as failed."""
    from optuna.trial import TrialState

    by_state = Counter(t.state for t in trials)
    return TrialCounts(complete=by_state[TrialState.COMPLETE], pruned=by_state[TrialState.PRUNED],
                       failed=by_state[TrialState.FAIL], running=by_state[TrialState.RUNNING],
                       waiting=by_state[TrialState.WAITING])


def unfinished_rows(trials: Iterable, baseline_config: Optional[dict] = None) -> pd.DataFrame:
    """Failed, pruned, running and waiting trials: columns trial, state, started, reason, configuration
    (the knobs that differ from ``baseline_config``)."""
    from optuna.trial import TrialState

    reason_attr = {TrialState.FAIL: "fail_reason", TrialState.PRUNED: "prune_reason"}
    records = []
    for t in trials:
        if t.state == TrialState.COMPLETE:
            continue
        attr = reason_attr.get(t.state)
        reason = t.user_attrs.get(attr) if attr else None
        if reason is None:
            reason = "in progress" if t.state in (TrialState.RUNNING, TrialState.WAITING) else "no reason recorded"
        started = f"{t.datetime_start:%Y-%m-%d %H:%M:%S}" if t.datetime_start else ""
        records.append({"trial": t.number, "state": t.state.name, "started": started, "reason": str(reason),
                        "configuration": describe_changes(TrialRecord.of_trial(t).config or t.params,
                                                          baseline_config)})
    return pd.DataFrame(records, columns=["trial", "state", "started", "reason", "configuration"])


def baseline_trials(rows: pd.DataFrame, baseline_config: Optional[dict]) -> list[int]:
    """Numbers of the baseline trials: the one the study queued as its baseline first, then any
    whose configuration equals the study's baseline (all knobs, version ignored)."""
    queued = [int(n) for n, a in zip(rows["trial"], rows["attrs"]) if a.get("anchor") == "baseline"]
    if not baseline_config:
        return queued
    wanted = _config_knobs(baseline_config)
    same = [int(n) for n, config in zip(rows["trial"], rows["config"]) if _config_knobs(config) == wanted]
    return queued + [n for n in same if n not in queued]


def describe_changes(config: dict, baseline_config: Optional[dict]) -> str:
    """The knobs of ``config`` that differ from ``baseline_config`` (all knobs when it is None), as
    ``"precision=int8, beam_width=1"``; ``"baseline configuration"`` when none differ."""
    reference = _config_knobs(baseline_config)
    changed = [f"{k}={format_knob(k, v)}" for k, v in _config_knobs(config).items()
               if k not in reference or reference[k] != v]
    if not changed:
        return "baseline configuration" if baseline_config else "default configuration"
    return ", ".join(changed)


def varying_knobs(rows: pd.DataFrame) -> list[str]:
    """Knobs that take more than one value across ``rows``, in :data:`KNOBS` order."""
    return [k for k in KNOBS if len({format_knob(k, v) for v in rows[k]}) > 1]


def measured(rows: pd.DataFrame, metric: str) -> bool:
    """Whether any row has ``metric`` measured."""
    return bool(rows[metric].notna().any())


def hover_text(row: pd.Series, knobs: Optional[Sequence[str]] = None, metrics: Sequence[str] = KEY_METRICS) -> str:
    """Plotly hover text (``<br>``-separated) for one row: trial number, every knob, key metrics."""
    lines = [f"<b>trial {int(row['trial'])}</b>" + (f" ({row['study']})" if row.get("study") else "")]
    lines += [f"{k} = {format_knob(k, row[k])}" for k in (KNOBS if knobs is None else knobs) if k in row]
    lines += [f"{METRICS[m].label}: {format_metric(m, row[m])}" for m in metrics]
    return "<br>".join(lines)


def metric_table(metrics: dict) -> pd.DataFrame:
    """Every known metric of one trial: columns metric, value (formatted, with unit), meaning."""
    records = [{"metric": m.label, "value": format_metric(name, metrics.get(name)), "meaning": m.doc}
               for name, m in METRICS.items() if name != "inverse_speedup"]
    return pd.DataFrame(records, columns=["metric", "value", "meaning"])


def config_table(config: dict, baseline_config: Optional[dict]) -> pd.DataFrame:
    """One trial's knobs beside the baseline's: columns knob, value, baseline, changed."""
    reference = _config_knobs(baseline_config or {})
    records = [{"knob": k, "value": format_knob(k, v),
                "baseline": format_knob(k, reference[k]) if k in reference else "",
                "changed": bool(reference) and k in reference and reference[k] != v}
               for k, v in _config_knobs(config).items()]
    return pd.DataFrame(records, columns=["knob", "value", "baseline", "changed"])


def transcript_table(transcripts: Sequence[dict]) -> pd.DataFrame:
    """Reference and hypothesis side by side with the utterance's own WER (fraction)."""
    import jiwer

    records = []
    for t in transcripts or []:
        ref, hyp = str(t.get("ref", "")), str(t.get("hyp", ""))
        wer = jiwer.wer(ref, hyp) if ref.strip() else float("nan")
        records.append({"id": t.get("id", ""), "reference": ref, "hypothesis": hyp, "WER": wer})
    return pd.DataFrame(records, columns=["id", "reference", "hypothesis", "WER"])


def side_by_side(rows: pd.DataFrame, numbers: Sequence[int]) -> pd.DataFrame:
    """Knobs and metrics of trials ``numbers`` as columns ``trial N``; ``differs`` flags rows that differ."""
    picked = rows.set_index("trial").loc[list(numbers)]
    fields = [(knob, knob, format_knob) for knob in KNOBS]
    fields += [(metric.label, name, format_metric) for name, metric in METRICS.items() if name != "inverse_speedup"]
    records = []
    for label, column, formatted in fields:
        values = [formatted(column, picked.at[n, column]) for n in numbers]
        records.append({"": label, **{f"trial {n}": v for n, v in zip(numbers, values)},
                        "differs": len(set(values)) > 1})
    return pd.DataFrame(records)


def wer_difference(rows: pd.DataFrame, a: int, b: int) -> Optional[str]:
    """WER of trial ``a`` minus trial ``b``, paired over the eval utterances, in words.

    ``None`` when either trial lacks per-utterance errors or they were measured on
    different utterances (another eval set or ``--limit``).
    """
    from dse.core.measure import paired_wer_difference

    picked = rows.set_index("trial")
    ea, eb = (TrialRecord.from_user_attrs(picked.at[n, "attrs"]).utterance_errors or [] for n in (a, b))
    if not ea or not eb:
        return None
    try:
        d, lo, hi = paired_wer_difference(ea, eb)
    except ValueError:
        return None
    verdict = ("the eval set does not tell them apart" if lo <= 0 <= hi
               else f"trial {a} is {'worse' if d > 0 else 'better'}")
    return (f"trial {a} vs trial {b}: WER {100 * d:+.1f} points, 95 % interval [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"(paired over {len(ea)} utterances): {verdict}")


def importance_problem(trials: Iterable) -> Optional[str]:
    """Why knob importance cannot be computed for these trials, or None when it can.

    Needs at least two COMPLETE trials and one searched parameter that takes two values among them.
    """
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return f"Knob importance needs at least 2 completed trials; this study has {len(complete)}."
    values: dict[str, set] = {}
    for t in complete:
        for name, v in t.params.items():
            values.setdefault(name, set()).add(repr(v))
    if not any(len(v) > 1 for v in values.values()):
        return ("Knob importance needs a searched knob that varies across the completed trials; "
                "they all have the same values.")
    return None


def knob_importances(study, objectives: Sequence[str]) -> dict[str, dict[str, float]]:
    """Objective metric -> {knob: importance}, normalised to sum to 1, with Optuna's default evaluator.

    ``objectives``: metric names in the order of ``trial.values``. The evaluator ranks knobs by
    how much they matter for reaching *low* values, so maximised objectives are negated.
    Call :func:`importance_problem` first; this raises what Optuna raises.
    """
    import warnings

    import optuna
    from optuna.study import StudyDirection

    result = {}
    for i, (metric, direction) in enumerate(zip(objectives, study.directions)):
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(
                study, target=lambda t, i=i, sign=sign: sign * t.values[i])
        result[metric] = {knob_of_param(name): v for name, v in raw.items()}
    return result


def knob_of_param(name: str) -> str:
    """The knob an Optuna parameter samples (``beam_width_level`` samples ``beam_width``)."""
    from dse.search.space import LEVEL_SUFFIX

    return name[:-len(LEVEL_SUFFIX)] if name.endswith(LEVEL_SUFFIX) else name


def objective_metrics(study_attrs: dict, n_values: int) -> list[str]:
    """Names of ``trial.values`` from the study's ``objectives`` attr (``objective 0``, ... when absent)."""
    objectives = [o.get("metric", f"objective {i}") for i, o in enumerate(study_attrs.get("objectives") or [])]
    return objectives if len(objectives) == n_values else [f"objective {i}" for i in range(n_values)]


def sqlite_path_missing(storage_url: str) -> Optional[str]:
    """The file path when ``storage_url`` is a SQLite file that does not exist (opening it would create it).
    A URI-form URL (``sqlite:///file:...``) is left to its own options."""
    from dse.search.storage import sqlite_path

    path = sqlite_path(storage_url)
    if path is None or storage_url.partition(":///")[2].startswith("file:"):
        return None
    return None if path.exists() else str(path)

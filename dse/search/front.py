"""The Pareto front of speed against accuracy, decided under measurement noise, and the recommendation.

Every completed trial carries a same-run speedup against the baseline with its bootstrap
95 % interval (``speedup.speedup_ci95``) and its per-utterance word errors on the eval
set (``utterance_errors``). Two trials compare objective by objective:

* **speed**: from a direct interleaved measurement of the pair when the study has one
  (``pair_speedups``: ``b``'s time over ``a``'s, with its interval), else from their two
  intervals against the baseline; ``a`` is *faster beyond noise* when the interval lies
  above 1 (or ``a``'s interval lies wholly above ``b``'s);
* **accuracy**: the paired WER difference over the same utterances with its bootstrap
  interval (:func:`dse.core.measure.paired_wer_difference`); identical per-utterance
  errors are an exact tie.

``a`` *dominates* ``b`` beyond noise when, in both objectives, it is better beyond noise
or exactly tied, and better in at least one. A trial is on the front unless another
dominates it beyond noise. A pair where ``a`` is nominally at least as good in both (its
point estimates would dominate) but not beyond noise is *undecided*: the study re-measures
the speed of such pairs interleaved against each other (:func:`undecided_pairs`), and the
front names the pairs that stay open.

The recommendation is the fastest front member within the limits that the baseline does
not dominate; when none is faster than the baseline beyond noise, it is the baseline,
and the summary says so in words.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from dse.core.record import TrialRecord

BETTER, WORSE, TIED, OPEN = "better", "worse", "tied", "open"


@dataclasses.dataclass(frozen=True)
class Point:
    """One completed trial as the front sees it. ``speedup``/``speedup_ci95``: against the
    baseline, same run (> 1 is faster); ``wer``: fraction; ``errors``: per eval utterance
    ``(word errors, reference words)``; ``limits_ok``: within the study's constraints."""
    trial: int
    speedup: float
    speedup_ci95: tuple[float, float]
    wer: Optional[float]
    errors: tuple
    description: str = ""
    is_baseline: bool = False
    limits_ok: bool = True


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``a`` against ``b``: each objective's outcome from ``a``'s side, with its figures."""
    a: int
    b: int
    speed: str
    speed_ratio: float              # b's time / a's time (> 1: a is faster)
    speed_ci95: tuple[float, float]
    accuracy: str
    wer_diff: Optional[float]       # WER(a) - WER(b), fraction
    wer_diff_ci95: Optional[tuple[float, float]]

    @property
    def dominates(self) -> bool:
        outcomes = (self.speed, self.accuracy)
        return all(o in (BETTER, TIED) for o in outcomes) and BETTER in outcomes

    @property
    def nominally_dominates(self) -> bool:
        """Point estimates at least as good in both, better in one (whatever the noise)."""
        at_least = self.speed_ratio >= 1 and (self.wer_diff is None or self.wer_diff <= 0)
        return at_least and (self.speed_ratio > 1 or (self.wer_diff or 0) < 0)

    @property
    def undecided(self) -> bool:
        return self.nominally_dominates and not self.dominates


def point_of(trial, baseline_number: Optional[int] = None, limits_ok: bool = True, description: str = "") -> Point:
    """The :class:`Point` of an Optuna ``FrozenTrial`` written by the study."""
    return point_from_record(trial.number, TrialRecord.of_trial(trial), baseline_number, limits_ok, description)


def point_from_record(number: int, record: TrialRecord, baseline_number: Optional[int] = None,
                      limits_ok: bool = True, description: str = "") -> Point:
    """The :class:`Point` of trial ``number`` from the record the study wrote."""
    ratio = record.speedup or {}
    speedup = float(ratio.get("speedup", float("nan")))
    lo, hi = ratio.get("speedup_ci95") or (speedup, speedup)
    if number == baseline_number:  # the reference: its speed relative to itself is 1 by definition
        speedup, lo, hi = 1.0, 1.0, 1.0
    return Point(number, speedup, (float(lo), float(hi)), (record.metrics or {}).get("wer"),
                 tuple(tuple(e) for e in record.utterance_errors or ()), description,
                 number == baseline_number, limits_ok)


def _key(a: int, b: int) -> str:
    return f"{a}-{b}"


_WER_DIFFERENCES: dict = {}  # (errors of a, errors of b) -> paired_wer_difference; bounded below


def _wer_difference(a_errors: list, b_errors: list) -> tuple[float, float, float]:
    """:func:`dse.core.measure.paired_wer_difference`, computed once per pair of error lists: a front
    compares every pair both ways, again at every adaptation check and for every table. The
    reverse pair is stored with it: with the same seed its bootstrap is the mirror image
    (the difference negated, the interval negated and swapped), exactly."""
    from dse.core.measure import paired_wer_difference

    key = (tuple(map(tuple, a_errors)), tuple(map(tuple, b_errors)))
    found = _WER_DIFFERENCES.get(key)
    if found is None:
        if len(_WER_DIFFERENCES) > 20000:
            _WER_DIFFERENCES.clear()
        diff, lo, hi = found = paired_wer_difference(a_errors, b_errors)
        _WER_DIFFERENCES[key] = found
        _WER_DIFFERENCES[(key[1], key[0])] = (-diff, -hi, -lo)
    return found


def compare(a: Point, b: Point, pair_speedups: Optional[dict] = None) -> Comparison:
    """``a`` against ``b`` (see the module docstring)."""
    direct = (pair_speedups or {}).get(_key(a.trial, b.trial))
    inverse = (pair_speedups or {}).get(_key(b.trial, a.trial))
    if direct:
        ratio, (lo, hi) = direct["speedup"], direct["speedup_ci95"]
    elif inverse:
        ratio, (lo, hi) = 1 / inverse["speedup"], (1 / inverse["speedup_ci95"][1], 1 / inverse["speedup_ci95"][0])
    elif b.is_baseline and not a.is_baseline:  # a's own same-run ratio against the baseline
        ratio, (lo, hi) = a.speedup, a.speedup_ci95
    elif a.is_baseline and not b.is_baseline:
        ratio, (lo, hi) = 1 / b.speedup, (1 / b.speedup_ci95[1], 1 / b.speedup_ci95[0])
    else:
        ratio = a.speedup / b.speedup
        lo, hi = a.speedup_ci95[0] / b.speedup_ci95[1], a.speedup_ci95[1] / b.speedup_ci95[0]
    if a.is_baseline and b.is_baseline:
        speed = TIED
    elif lo > 1:
        speed = BETTER
    elif hi < 1:
        speed = WORSE
    else:
        speed = OPEN
    wer_diff = ci = None
    if a.wer is None or b.wer is None:
        accuracy = OPEN
    elif a.errors and a.errors == b.errors:
        accuracy, wer_diff, ci = TIED, 0.0, (0.0, 0.0)
    elif a.errors and b.errors and len(a.errors) == len(b.errors):
        wer_diff, d_lo, d_hi = _wer_difference(a.errors, b.errors)
        ci = (d_lo, d_hi)
        accuracy = BETTER if d_hi < 0 else WORSE if d_lo > 0 else OPEN
    else:
        wer_diff = a.wer - b.wer
        accuracy = OPEN if wer_diff else TIED
    return Comparison(a.trial, b.trial, speed, ratio, (lo, hi), accuracy, wer_diff, ci)


@dataclasses.dataclass
class Front:
    """``members``: trial numbers on the front (not dominated beyond noise), fastest first;
    ``dominated``: trial -> the trial that dominates it; ``undecided``: pairs ``(a, b)``
    where ``a`` nominally dominates ``b`` but not beyond noise."""
    members: list[int]
    dominated: dict[int, int]
    undecided: list[tuple[int, int]]
    points: dict[int, Point]

    def is_undecided(self, trial: int) -> bool:
        return any(trial == b for _, b in self.undecided)


def noisy_front(points: Sequence[Point], pair_speedups: Optional[dict] = None) -> Front:
    """The front of ``points`` under noise (see the module docstring)."""
    by_trial = {p.trial: p for p in points}
    dominated: dict[int, int] = {}
    undecided = []
    for a in points:
        for b in points:
            if a.trial == b.trial:
                continue
            c = compare(a, b, pair_speedups)
            if c.dominates:
                dominated.setdefault(b.trial, a.trial)
            elif c.undecided:
                undecided.append((a.trial, b.trial))
    members = sorted((p.trial for p in points if p.trial not in dominated),
                     key=lambda t: (-by_trial[t].speedup, t))
    undecided = [(a, b) for a, b in undecided if a not in dominated and b not in dominated]
    return Front(members, dominated, undecided, by_trial)


def undecided_pairs(front: Front, pair_speedups: Optional[dict] = None) -> list[tuple[int, int]]:
    """Undecided front pairs whose open objective is speed (WER is fixed by the eval set;
    only a pair's speed can be measured again), most promising first."""
    out = []
    for a, b in front.undecided:
        c = compare(front.points[a], front.points[b], pair_speedups)
        if c.speed == OPEN and c.accuracy in (BETTER, TIED, OPEN):
            out.append((a, b))
    return out


@dataclasses.dataclass(frozen=True)
class Recommendation:
    trial: int
    is_baseline: bool
    versus_baseline: Optional[Comparison]
    sentence: str


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def describe_against_baseline(c: Comparison, label: str) -> str:
    speed = f"{c.speed_ratio:.2f}x [{c.speed_ci95[0]:.2f}, {c.speed_ci95[1]:.2f}] the baseline's speed"
    if c.wer_diff is None:
        wer = "WER not measured"
    elif c.wer_diff_ci95 is None:
        wer = f"{_pts(c.wer_diff)} pts WER"
    else:
        wer = f"{_pts(c.wer_diff)} pts WER [{_pts(c.wer_diff_ci95[0])}, {_pts(c.wer_diff_ci95[1])}]"
    verdict = {BETTER: "faster", WORSE: "slower", TIED: "as fast", OPEN: "not distinguishably faster"}[c.speed]
    return f"{label} is {speed} ({verdict}) at {wer}"


def beats(p, base, pair_speedups: Optional[dict] = None) -> bool:
    """``p`` is faster than the baseline point ``base`` beyond noise and not dominated by it."""
    return compare(p, base, pair_speedups).speed == BETTER and not compare(base, p, pair_speedups).dominates


def recommend(front: Front, baseline: int, pair_speedups: Optional[dict] = None) -> Recommendation:
    """The fastest front member within the limits that the baseline does not dominate and that
    is faster than the baseline beyond noise; otherwise the baseline."""
    base = front.points[baseline]
    for t in front.members:
        p = front.points[t]
        if t == baseline or not p.limits_ok:
            continue
        if base.limits_ok and not beats(p, base, pair_speedups):
            continue  # (a baseline outside the limits cannot be shipped: it rules nothing out)
        c = compare(p, base, pair_speedups)
        return Recommendation(t, False, c, "recommended: " + describe_against_baseline(c, f"trial {t} ({p.description})"))
    if not base.limits_ok:
        return Recommendation(baseline, True, None, "no trial meets the limits (the baseline does not either)")
    return Recommendation(baseline, True, None,
                          f"no configuration beats the baseline within the limits: recommended is the baseline "
                          f"(trial {baseline}, {base.description})")


def summary(front: Front, baseline: int, all_points: Sequence[Point], pair_speedups: Optional[dict] = None) -> list[str]:
    """What the study found, in a few lines: the recommendation, then every measured trial
    that is slower than the baseline beyond noise, and the pairs the noise leaves open."""
    rec = recommend(front, baseline, pair_speedups)
    lines = [rec.sentence]
    base = front.points[baseline]
    slower = [p for p in all_points if p.trial != baseline and compare(p, base, pair_speedups).speed == WORSE]
    if slower:
        lines.append("slower than the baseline: " + "; ".join(
            f"trial {p.trial} ({p.description}) {p.speedup:.2f}x" for p in slower))
    if front.undecided:
        lines.append("undecided under noise (kept on the front): " + ", ".join(
            f"{a} vs {b}" for a, b in front.undecided))
    return lines

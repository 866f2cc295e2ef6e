"""Trials per hour of the ``precision`` study on the embedded default, and where the time goes.

    python benchmarks/study_throughput.py [--n-trials 6] [--study precision]

Runs a real study into a temporary SQLite storage (the same code path as
``python -m dse.run``), then reads every trial back through Optuna and prints its
wall time, the share of each phase (build, adapt, compile, measure = timed
streaming pass with WER, baseline = same-run ratio), and trials per hour.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from dse import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-trials", type=int, default=6)
    p.add_argument("--study", default="precision")
    p.add_argument("--eval-limit", type=int, help="first N eval utterances (default: the whole eval split)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'bench.db'}"
        extra = ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []
        t0 = time.perf_counter()
        run.main(["--study", args.study, "--storage", storage, "--n-trials", str(args.n_trials), *extra])
        wall = time.perf_counter() - t0
        study = optuna.load_study(study_name=args.study, storage=storage)
        trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
        durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
        phases: dict[str, float] = {}
        for t in trials:
            for k, v in (t.user_attrs.get("phases_s") or {}).items():
                phases[k] = phases.get(k, 0.0) + v
        total = sum(durations)
        print(f"\n{len(trials)} trials ({sum(t.state == TrialState.COMPLETE for t in trials)} complete) "
              f"in {wall:.0f} s wall, start-up included")
        print(f"per trial: median {statistics.median(durations):.1f} s, max {max(durations):.1f} s; "
              f"{3600 / statistics.mean(durations):.0f} trials per hour")
        print(f"reused WER: {sum('reused_wer_from' in t.user_attrs for t in trials)} of {len(trials)} trials")
        for name, secs in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<10} {secs:8.1f} s  {secs / total:6.1%}")
        print(f"  {'other':<10} {total - sum(phases.values()):8.1f} s  {(total - sum(phases.values())) / total:6.1%}")


if __name__ == "__main__":
    main()

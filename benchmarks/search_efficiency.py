"""How much of the exhaustive grid's hypervolume NSGA-II and TPE reach with 25 % of its trials.

    python benchmarks/search_efficiency.py [--utterances 40] [--seeds 10] [--table grid.json]

1. Every configuration of a small discrete space (precision x beam width x right
   context on the embedded default) is built and measured for real once: WER and
   mean RTF from the same streaming pass. The table is saved (``--table``) so a
   rerun can skip this step.
2. Each sampler, made exactly as ``python -m dse.run`` makes it for a study of that
   many trials, then runs ``25 %`` of the grid's size as trials against that table
   (one real measurement per configuration; the sampler sees the measured values),
   for ``--seeds`` seeds, suggesting through :meth:`dse.search.space.Space.suggest` as a
   study does. Printed: the hypervolume it reached as a fraction of the whole grid's
   hypervolume (both objectives minimised, reference point 1.1 x the worst value of
   each), median and worst over seeds. ``gp-categorical`` and ``tpe-categorical``
   suggest every knob as an unordered category, to show what ordered levels are worth.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import optuna
import torch
import yaml
from optuna._hypervolume import compute_hypervolume

from dse.core.config import TrialConfig
from dse.core.measure import load_eval_audio, measure
from dse.core.models import DEFAULT_EVAL, load_model
from dse.search.study import make_sampler
from dse.search.space import load_space
from dse.core.build import build_recognizer

GRID = {"precision": ["fp32", "bf16", "int8"], "beam_width": [1, 2, 4, 8], "right_context_frames": [0, 4, 8]}


def measure_grid(utterances: int) -> dict:
    loaded = load_model()
    audio = load_eval_audio(DEFAULT_EVAL, utterances)
    torch.set_num_threads(2)
    table = {}
    keys = list(GRID)
    for values in itertools.product(*GRID.values()):
        cfg = TrialConfig(**dict(zip(keys, values)))
        r = measure(build_recognizer(loaded, cfg).recognizer, audio, accuracy=True)
        table[json.dumps(dict(zip(keys, values)), sort_keys=True)] = [r["wer"], r["rtf_mean"]]
        print(f"  {dict(zip(keys, values))}: WER {r['wer']:.3f}, RTF {r['rtf_mean']:.4f}", flush=True)
    return table


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    return float(compute_hypervolume(points, ref))


def grid_space(n_trials: int):
    """The grid as a search space file, loaded the way ``python -m dse.run`` loads one."""
    spec = {"description": "search-efficiency grid", "model": "default", "sampler": "gp", "n_trials": n_trials,
            "objectives": [{"metric": "wer", "direction": "minimize"},
                           {"metric": "rtf_mean", "direction": "minimize"}],
            "params": {k: {"choices": v} for k, v in GRID.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(yaml.safe_dump(spec))
        return load_space(str(path))


def run_sampler(name: str, table: dict, space, n_trials: int, seed: int) -> np.ndarray:
    levels = not name.endswith("-categorical")
    sampler = make_sampler(name.removesuffix("-categorical"), space, seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)

    def objective(trial):
        cfg = space.suggest(trial, levels=levels)
        return table[json.dumps({k: getattr(cfg, k) for k in GRID}, sort_keys=True)]

    study.optimize(objective, n_trials=n_trials)
    return np.array([t.values for t in study.trials])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=40)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--table", type=Path, help="JSON file to save (or reuse) the measured grid")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.table and args.table.exists():
        table = json.loads(args.table.read_text())
        print(f"grid table read from {args.table}")
    else:
        print(f"measuring the grid ({math.prod(len(v) for v in GRID.values())} configurations):")
        table = measure_grid(args.utterances)
        if args.table:
            args.table.write_text(json.dumps(table))
    points = np.array(list(table.values()))
    ref = points.max(axis=0) * 1.1
    full = hypervolume(points, ref)
    n = max(1, round(0.25 * len(table)))
    print(f"grid: {len(table)} configurations, hypervolume {full:.5f}; samplers get {n} trials (25 %)")
    space = grid_space(n)
    for name in ("gp", "gp-categorical", "tpe", "tpe-categorical", "nsga2", "random"):
        fractions = [hypervolume(run_sampler(name, table, space, n, seed), ref) / full for seed in range(args.seeds)]
        print(f"  {name:<15} hypervolume fraction: median {statistics.median(fractions):.3f}, "
              f"worst {min(fractions):.3f}, best {max(fractions):.3f} over {args.seeds} seeds")


if __name__ == "__main__":
    main()

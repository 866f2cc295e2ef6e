"""Replay a study on a recorded grid: how much of the front the default sampler finds, and what
duplicates and early stopping cost or save.

    python benchmarks/study_replay.py measure --space moe [--utterances 60]   # once: the grid table
    python benchmarks/study_replay.py replay --space moe [--seeds 10]         # no CPU time

``measure`` runs every distinct configuration of the space once through the study's own
trial (:func:`dse.search.study.run_trial`: build, adaptation with its checks, the timed
streaming pass with WER, the same-run ratio against the baseline) on the first
``--utterances`` eval utterances, and records each trial's record, phase times and
adaptation checks (dev WER and per-utterance dev errors), plus the dev measurement of every
un-adapted weight set the early stop compares against. The table is written to
``benchmarks/fixtures/grid-<space>.json`` with the machine and its load.

``replay`` runs the study as ``python -m dse.run`` runs it (its sampler, the baseline and
anchors queued first, duplicate proposals recorded and replaced, the early stop at each
recorded check) with every measurement looked up in the table, for ``--seeds`` sampler
seeds, with a budget of 25 % of the grid's distinct configurations. Printed, median and
range over seeds:

* the fraction of the grid front's hypervolume reached (both objectives of the space,
  reference point 1.1 x the worst value of each);
* the share of the study's wall time spent on duplicates and on pruned adaptation (wall
  time = the recorded phase times of what the study ran; a pruned adaptation costs the
  steps it ran);
* with early stopping against without it (the same seeds): adaptation time, and whether the
  final front is the same.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _args(cache_dir: str, utterances: int):
    return types.SimpleNamespace(model=None, lm=None, eval_set=None, eval_limit=utterances, adapt_set=None,
                                 cache_dir=cache_dir, device="cpu", profile=False, seed=None)


def measure_grid(space_name: str, utterances: int, cache_dir: str, out: Path) -> None:
    import psutil
    import torch

    from dse.core.measure import machine_fingerprint
    from dse.search.space import load_space
    from dse.search.study import DevReference, _dev_errors_key, load_context, run_trial

    space = load_space(space_name)
    ctx = load_context(space, _args(cache_dir, utterances))
    space = ctx.space
    configs = space.configurations()
    table = {"space": space_name, "utterances": utterances, "machine": machine_fingerprint(),
             "configurations": {}, "dev_errors": {}}
    done = json.loads(out.read_text())["configurations"] if out.exists() else {}
    table["configurations"].update(done)
    study = optuna.create_study(directions=space.directions)  # holds the dev measurements
    reference = DevReference(ctx)
    print(f"{space_name}: {len(configs)} distinct configurations, {utterances} eval utterances", flush=True)
    for i, cfg in enumerate(configs):
        key = cfg.key()
        if key in table["configurations"]:
            continue
        checks, probe = [], {}
        cpu0, t0 = psutil.cpu_times(), time.perf_counter()
        try:
            record = run_trial(ctx, cfg, on_adapt_progress=lambda s, w, e=None: checks.append([s, w, e]),
                               on_speed_probe=probe.update)
        except Exception as exc:  # recorded as a failed configuration, as the study would
            table["configurations"][key] = {"config": cfg.to_dict(), "failed": f"{type(exc).__name__}: {exc}"}
            print(f"  [{i + 1}/{len(configs)}] failed: {exc}", flush=True)
            continue
        wall = time.perf_counter() - t0
        busy = sum(psutil.cpu_times()) - psutil.cpu_times().idle - (sum(cpu0) - cpu0.idle)
        entry = {"config": cfg.to_dict(), "attrs": record.to_user_attrs(), "checks": checks,
                 "speed_before_adapting": probe or None, "wall_s": wall,
                 "cpu_busy_cores": busy / wall}
        table["configurations"][key] = entry
        m = record.metrics
        print(f"  [{i + 1}/{len(configs)}] {key}: WER {m['wer']:.3f}, speedup {m['speedup']:.2f}x, "
              f"{wall:.0f} s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table))
    for cfg in configs:  # the dev measurement of every weight set (the early stop's yardstick)
        cfg = cfg.resolved(ctx.loaded.arch)
        dkey = _dev_errors_key(cfg)
        if dkey not in table["dev_errors"]:
            table["dev_errors"][dkey] = reference.errors(study, cfg)
    out.write_text(json.dumps(table))
    torch.set_num_threads(2)
    print(f"written {out}")


class Replay:
    """The study's own objective over the recorded table (``dse.search.study.run_trial`` and the dev
    reference replaced by look-ups); accounts the wall time each trial would have taken."""

    def __init__(self, table: dict, prune: bool):
        self.table = table
        self.prune = prune
        self.seconds = {"measured": 0.0, "duplicates": 0.0, "pruned adaptation": 0.0, "adaptation": 0.0}
        self.pruned = 0

    def run_trial(self, ctx, config, on_adapt_progress=None, on_speed_probe=None, **_):
        from dse.core.record import TrialRecord
        from dse.search.study import Pruned

        entry = self.table["configurations"][config.key()]
        if "failed" in entry:
            raise RuntimeError(entry["failed"])
        phases = entry["attrs"].get("phases_s", {})
        adapt_s = phases.get("adapt", 0.0)
        if config.adapt_steps > 0 and on_speed_probe is not None and entry.get("speed_before_adapting"):
            on_speed_probe(entry["speed_before_adapting"])
            for step, wer, errors in entry["checks"]:
                try:
                    if self.prune:
                        on_adapt_progress(step, wer, errors)
                except Pruned:
                    spent = phases.get("speed probe", 0.0) + phases.get("build", 0.0) + adapt_s * step / config.adapt_steps
                    self.seconds["pruned adaptation"] += spent
                    self.seconds["adaptation"] += adapt_s * step / config.adapt_steps
                    self.pruned += 1
                    raise
        self.seconds["measured"] += sum(phases.values())
        self.seconds["adaptation"] += adapt_s
        attrs = dict(entry["attrs"])
        return TrialRecord.from_user_attrs(attrs)

    def dev_errors(self, reference, study, config):
        from dse.search.study import _dev_errors_key

        return self.table["dev_errors"].get(_dev_errors_key(config.resolved(self.arch)))


def replay(space_name: str, table: dict, seed: int, budget: int, prune: bool, anchors: bool = True):
    from rich.console import Console

    from dse.core.models import load_model
    from dse.search import study as study_mod
    from dse.search.space import load_space
    from dse.search.study import DistinctTrials, enqueue_anchors, make_objective, make_sampler

    space = load_space(space_name)
    loaded = load_model()
    space = space.for_model(loaded.lm_path is not None)
    if not prune:
        space = type(space)(**{**space.__dict__, "prune": {}})
    r = Replay(table, prune)
    r.arch = loaded.arch
    saved = study_mod.run_trial, study_mod.DevReference.errors
    study_mod.run_trial = r.run_trial
    study_mod.DevReference.errors = lambda ref, study, config: r.dev_errors(ref, study, config)
    try:
        study = optuna.create_study(directions=space.directions, sampler=make_sampler(space.sampler, space, seed))
        levels = not isinstance(study.sampler, optuna.samplers.GridSampler)
        if anchors:
            enqueue_anchors(study, space, levels)
        ctx = types.SimpleNamespace(space=space, loaded=loaded, adapt_fn=None)
        study.optimize(make_objective(ctx, Console(quiet=True), seed), n_trials=None, catch=(Exception,),
                       callbacks=[DistinctTrials(budget)])
    finally:
        study_mod.run_trial, study_mod.DevReference.errors = saved
    from optuna.trial import TrialState
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    dups = [t for t in study.trials if t.user_attrs.get("duplicate_of") is not None]
    return study, complete, dups, r


def objectives_of(attrs: dict, metrics: list[str]) -> list[float]:
    return [attrs["metrics"][m] for m in metrics]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["measure", "replay"])
    p.add_argument("--space", default="moe")
    p.add_argument("--utterances", type=int, default=60, help="eval utterances per measured configuration")
    p.add_argument("--cache-dir", default="/tmp/dse-grid-adapted", help="adaptation cache of the measurement")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--table", type=Path, help="grid table (default benchmarks/fixtures/grid-<space>.json)")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    path = args.table or FIXTURES / f"grid-{args.space}.json"
    if args.command == "measure":
        measure_grid(args.space, args.utterances, args.cache_dir, path)
        return 0
    table = json.loads(path.read_text())
    from dse.search.space import load_space
    space = load_space(args.space)
    keys = {c.key() for c in space.for_model(True).configurations()}
    table["configurations"] = {k: v for k, v in table["configurations"].items() if k in keys}
    # A configuration whose adaptation the grid found cached (its twin in the other precision ran
    # first) recorded no checks; the checks are the same (the dev measurement runs in fp32).
    from dse.core.config import TrialConfig
    checks = {TrialConfig.from_dict(e["config"]).weights_key(): e["checks"]
              for e in table["configurations"].values() if e.get("checks")}
    for e in table["configurations"].values():
        if e["config"]["adapt_steps"] and not e.get("checks"):
            e["checks"] = checks.get(TrialConfig.from_dict(e["config"]).weights_key(), [])
    metrics = [o.metric for o in space.objectives]
    measured = [e for e in table["configurations"].values() if "attrs" in e]
    points = np.array([objectives_of(e["attrs"], metrics) for e in measured])
    ref = points.max(axis=0) * 1.1
    full = float(compute_hypervolume(points, ref))
    budget = max(1, round(0.25 * len(table["configurations"])))
    print(f"{args.space}: {len(table['configurations'])} distinct configurations in the table "
          f"({table['utterances']} eval utterances each, {table['machine']['cpu_model']}); "
          f"budget {budget} distinct configurations (25 %), {args.seeds} seeds, objectives {metrics}")
    rows = {True: [], False: []}
    for prune in (True, False):
        for seed in range(args.seeds):
            study, complete, dups, r = replay(args.space, table, seed, budget, prune)
            values = np.array([objectives_of(t.user_attrs, metrics) for t in complete])
            hv = float(compute_hypervolume(values, ref)) / full if len(values) else 0.0
            total = sum(v for k, v in r.seconds.items() if k in ("measured", "pruned adaptation"))
            front = sorted(t.number for t in study.best_trials) if complete else []
            front_keys = sorted(study.trials[n].user_attrs["config_key"] for n in front)
            # time spent measuring a configuration a second time (what deduplication must make 0)
            seen, again = set(), 0.0
            for t in complete:
                k = t.user_attrs["config_key"]
                if k in seen:
                    again += sum((t.user_attrs.get("phases_s") or {}).values())
                seen.add(k)
            rows[prune].append({"hv": hv, "dups": len(dups), "dup_share": again / total if total else 0.0,
                                "pruned_share": r.seconds["pruned adaptation"] / total if total else 0.0,
                                "adapt_s": r.seconds["adaptation"], "total_s": total, "pruned": r.pruned,
                                "front": front_keys})
    for prune, label in ((True, "with early stopping"), (False, "without early stopping")):
        rs = rows[prune]
        hv = [r["hv"] for r in rs]
        print(f"  {label}: hypervolume fraction median {statistics.median(hv):.3f} [{min(hv):.3f}, {max(hv):.3f}]; "
              f"duplicate proposals {sum(r['dups'] for r in rs)} over {len(rs)} studies, wall time measuring a "
              f"configuration twice "
              f"{100 * statistics.median(r['dup_share'] for r in rs):.0f} %; pruned adaptations "
              f"{sum(r['pruned'] for r in rs)}, wall time on them {100 * statistics.median(r['pruned_share'] for r in rs):.1f} % "
              f"(median); adaptation time median {statistics.median(r['adapt_s'] for r in rs):.0f} s, "
              f"study time median {statistics.median(r['total_s'] for r in rs):.0f} s")
    plain = []
    for seed in range(args.seeds):  # the same sampler and deduplication, without the baseline and anchors queued
        study, complete, dups, r = replay(args.space, table, seed, budget, True, anchors=False)
        values = np.array([objectives_of(t.user_attrs, metrics) for t in complete])
        plain.append(float(compute_hypervolume(values, ref)) / full if len(values) else 0.0)
    print(f"  without the baseline and anchors queued: hypervolume fraction median {statistics.median(plain):.3f} "
          f"[{min(plain):.3f}, {max(plain):.3f}]")
    saved = [a["adapt_s"] - b["adapt_s"] for a, b in zip(rows[False], rows[True])]
    same_front = sum(a["front"] == b["front"] for a, b in zip(rows[False], rows[True]))
    print(f"  early stopping saves {statistics.median(saved):.0f} s of adaptation per study (median, same seeds; "
          f"range {min(saved):.0f} to {max(saved):.0f} s); the same final front in {same_front} of {len(saved)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())

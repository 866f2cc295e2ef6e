"""Run a design-space study: ``python -m dse.run --study moe``.

Each trial samples a configuration from ``search_spaces/<study>.yaml``, builds the
streaming model (adapting its weights when the space asks for it), times it on this
CPU, measures WER on the eval split from the same streaming pass, and records
everything in an Optuna study: objectives as trial values, every metric, the
configuration, the machine fingerprint and the phase durations in ``user_attrs``.

Studies live in an Optuna RDB storage (default: SQLite ``studies.db`` at the project
root). Re-running the same command resumes the study until it holds ``--n-trials``
distinct finished configurations (a repeat proposal is pruned in seconds and does not count). Many workers can share one storage (``--storage
postgresql://...``); a worker killed mid-trial is detected by Optuna's heartbeat and
its trial is marked FAIL and retried once. On one machine, timing is serialised by a
lock file, so run one timing worker per machine (adaptation may overlap).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dse.core.errors import DSEError, cli_error, exit_with, not_empty, redact
from dse.core.interrupts import INTERRUPTS
from dse.search.storage import DEFAULT_STORAGE

def main(argv=None) -> int:
    from dse.search.space import SAMPLERS

    p = argparse.ArgumentParser(prog="python -m dse.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="search space: a name in search_spaces/ (moe, precision, context, "
                                                  "frame, full, base-latency) or a YAML path")
    p.add_argument("--n-trials", type=int, help="distinct configurations the study should hold, finished (default: "
                                                "the space's n_trials; 0 runs none and prints the front)")
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds from the start of the "
                                                 "run (default: the space's timeout, if it sets one; 0: no limit); "
                                                 "the trial in flight finishes, at least one trial starts, and the "
                                                 "same command adds more later")
    p.add_argument("--storage", default=os.environ.get("DSE_STORAGE", DEFAULT_STORAGE),
                   help=f"Optuna storage URL (default {DEFAULT_STORAGE}; postgresql://user@host/db for many workers)")
    p.add_argument("--study-name", help="name of the study in the storage (default: the space's name)")
    p.add_argument("--sampler", choices=SAMPLERS, help="override the space's sampler")
    p.add_argument("--model", help="'default', '<arch>-random', an architecture name or a checkpoint path")
    p.add_argument("--lm", help="character language model (.lm.gz) for trials with lm_weight > 0; default: the "
                                "one beside the checkpoint (the embedded default ships one)")
    p.add_argument("--eval-set", help="JSONL manifest or LibriSpeech directory (default: the shipped eval split)")
    p.add_argument("--eval-limit", type=int, help="use only the first N eval utterances")
    p.add_argument("--adapt-set", help="manifest of the adaptation split (default: the shipped adapt split)")
    p.add_argument("--cache-dir", help="adaptation cache (default ~/.cache/dse/adapted)")
    p.add_argument("--device", default="cpu", help="device for adaptation: cpu (default) or cuda")
    p.add_argument("--seed", type=int, help="sampler seed (default: a fresh one per worker, printed, so that "
                                            "workers sharing a storage do not propose the same configurations)")
    p.add_argument("--profile", action="store_true", help="store an operator breakdown per trial")
    args = p.parse_args(argv)
    if args.n_trials is not None and args.n_trials < 0:
        p.error(f"--n-trials {args.n_trials}: give 0 or more distinct configurations")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        p.error(f"--seed {args.seed}: give a whole number from 0 to {2**32 - 1}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device {args.device!r}: give cpu or cuda (cuda:N for one device)")
    if args.eval_limit is not None and args.eval_limit < 1:
        p.error(f"--eval-limit {args.eval_limit}: give 1 or more utterances")
    if args.timeout is not None and not 0 <= args.timeout < float("inf"):
        p.error(f"--timeout {args.timeout}: give 0 (no limit) or a positive number of seconds")

    from rich.console import Console

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    # An interrupt that lands inside a storage query makes SQLAlchemy log "Error closing cursor"
    # with a traceback; the interruption itself is reported in one line below.
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
    with INTERRUPTS.installed():  # SIGTERM stops a worker as Ctrl-C does
        try:
            return _run(args, console)
        except DSEError as exc:
            return cli_error(exc)
        except KeyboardInterrupt:  # before the study started (loading) or after (the summary)
            console.print("[yellow]interrupted[/yellow]: no trial was in flight; run the same command again")
            return 130


def _run(args, console) -> int:
    import random
    import time

    started = time.monotonic()
    import optuna
    from dse.search.space import load_space
    from dse.search.storage import make_storage
    from dse.search.study import (DistinctTrials, enqueue_anchors, eval_set_of, finished_count, load_context,
                                  load_worker_model, make_objective, make_sampler, model_identity, resolve_front,
                                  resume_conflicts)

    space = load_space(args.study)
    eval_set_of(args)  # a missing eval set is refused before the storage is touched
    loaded = load_worker_model(space, args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = not_empty(args.study_name, "--study-name", "a name, or leave it out for the space's name") or space.name
    storage = make_storage(args.storage)
    where = redact(args.storage)
    # Each worker draws its own sampler seed unless the user fixes one: siblings on one storage
    # must not propose the same start-up configurations.
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    sampler = make_sampler(args.sampler or space.sampler, space, seed)
    target = space.n_trials if args.n_trials is None else args.n_trials
    ctx = None
    if target > 0 and study_name not in optuna.get_all_study_names(storage=storage):
        # a new study is created only once its eval audio is read: unusable audio leaves none behind
        ctx = load_context(space, args, loaded)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=space.directions,
                                sampler=sampler, load_if_exists=True)
    if list(study.directions) != [optuna.study.StudyDirection.MINIMIZE if d == "minimize" else
                                  optuna.study.StudyDirection.MAXIMIZE for d in space.directions]:
        raise DSEError(f"study {study_name!r} in {where} has other objectives than {space.path}; "
                       "use another --study-name")
    levels = not isinstance(study.sampler, optuna.samplers.GridSampler)
    finished = finished_count(study)
    conflicts = resume_conflicts(study, space, levels)
    if conflicts and target > finished:  # with nothing to run, the front is still printed
        raise DSEError(f"study {study_name!r} in {where} was searched with other choices than {space.path.name} "
                       f"gives now ({'; '.join(conflicts)}); put them back, or run under another --study-name")
    study.set_metric_names([o.metric for o in space.objectives])
    study.set_user_attr("space", space.name)
    study.set_user_attr("objectives", [o.__dict__ for o in space.objectives])
    study.set_user_attr("constraints", [c.__dict__ for c in space.constraints])
    remaining = target - finished
    console.print(f"study [bold]{study_name}[/bold] in {where}: {finished} distinct configurations "
                  f"finished, {max(0, remaining)} to run (sampler seed {seed})")
    if remaining > 0:
        ctx = ctx or load_context(space, args, loaded)
        baseline = ctx.space.baseline_config().to_dict()
        before = study.user_attrs.get("baseline_config")
        changed = sorted(k for k in baseline if before and k in before and before[k] != baseline[k])
        if changed:
            console.print("[yellow]note:[/yellow] this study's baseline changed since its earlier trials ("
                          + ", ".join(f"{k} {before[k]} -> {baseline[k]}" for k in changed)
                          + "); trials run before and after differ in these knobs, so compare them with "
                            "care or start a new --study-name")
        study.set_user_attr("baseline_config", baseline)
        study.set_user_attr("eval_set", str(Path(ctx.eval_set).resolve()))
        study.set_user_attr("adapt_set", str(ctx.adapt_fn.manifest) if ctx.adapt_fn else None)
        study.set_user_attr("eval_limit", args.eval_limit or space.eval_limit)
        study.set_user_attr("model", model_identity(ctx.loaded))
        console.print(f"model {ctx.loaded.name} ({ctx.loaded.weights}), {len(ctx.audio.waveforms)} eval utterances"
                      + (f", {len(ctx.audio.skipped)} skipped" if ctx.audio.skipped else ""))
        enqueue_anchors(study, ctx.space, levels, log=lambda msg: console.print(f"  {msg}"))
        # Optuna logs a failed trial's traceback at WARNING; the objective prints one line itself.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        budget = space.timeout if args.timeout is None else (args.timeout or None)
        # loading may have spent the budget: one trial still starts (Optuna checks before each)
        timeout = max(1.0, budget - (time.monotonic() - started)) if budget else None
        try:
            with INTERRUPTS.held():  # a signal in Optuna's bookkeeping waits for a safe point
                study.optimize(make_objective(ctx, console, seed), n_trials=None, timeout=timeout,
                               catch=(Exception,), gc_after_trial=True,
                               callbacks=[DistinctTrials(target), INTERRUPTS.check])
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]: a trial in flight is recorded as FAIL; "
                          "run the same command again to resume")
            _report(study, space, console)
            return 130
        if study.user_attrs.get("exhausted") and finished_count(study) < target:
            console.print(f"the space is exhausted: all {finished_count(study)} distinct configurations of "
                          f"{space.name} are measured (asked for {target})")
        elif budget and finished_count(study) < target:
            console.print(f"time budget: no new trial after {budget:.0f} s ({'--timeout' if args.timeout else space.path.name}); "
                          f"{finished_count(study)} of {target} distinct configurations finished: run the same command "
                          "again to add the rest (--timeout 0: no limit)")
        try:
            resolve_front(study, ctx, console)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow] while re-measuring the front: every trial is recorded; "
                          "the pairs not re-measured are left to the noise")
            _report(study, space, console)
            return 130
    _report(study, space, console)
    from optuna.trial import TrialState
    states = [t.state for t in study.get_trials(deepcopy=False)]
    if remaining > 0 and TrialState.FAIL in states and TrialState.COMPLETE not in states:
        console.print("[red]every trial failed[/red]: see the reasons above (or the trials' fail_reason)")
        return 1
    return 0


def _report(study, space, console) -> None:
    from dse.search.study import pareto_table, study_summary

    console.print(pareto_table(study, space))
    for line in study_summary(study, space):
        console.print(line)

if __name__ == "__main__":
    exit_with(main)

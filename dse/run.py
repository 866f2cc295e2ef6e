"""Run a design-space study: ``python -m dse.run --study moe``.

Each trial samples a configuration from ``search_spaces/<study>.yaml``, builds the
streaming model (adapting its weights when the space asks for it), times it on this
CPU, measures WER on the eval split from the same streaming pass, and records
everything in an Optuna study: objectives as trial values, every metric, the
configuration, the machine fingerprint and the phase durations in ``user_attrs``.

Studies live in an Optuna RDB storage (default: SQLite ``studies.db`` at the project
root). Re-running the same command resumes the study until it holds ``--n-trials``
finished trials. Many workers can share one storage (``--storage
postgresql://...``); a worker killed mid-trial is detected by Optuna's heartbeat and
its trial is marked FAIL and retried once. On one machine, timing is serialised by a
lock file, so run one timing worker per machine (adaptation may overlap).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dse.core.errors import DSEError, cli_error
from dse.search.storage import DEFAULT_STORAGE

def main(argv=None) -> int:
    from dse.search.space import SAMPLERS

    p = argparse.ArgumentParser(prog="python -m dse.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="search space: a name in search_spaces/ (moe, precision, context, "
                                                  "frame, full, base-latency) or a YAML path")
    p.add_argument("--n-trials", type=int, help="finished trials the study should hold (default: the space's n_trials)")
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
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
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--profile", action="store_true", help="store an operator breakdown per trial")
    args = p.parse_args(argv)

    from rich.console import Console

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    try:
        import optuna
        from dse.search.space import load_space
        from dse.search.storage import make_storage
        from dse.search.study import (finished_count, load_context, make_objective, make_sampler, model_identity,
                                      pareto_table)

        space = load_space(args.study)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = make_storage(args.storage)
        study_name = args.study_name or space.name
        sampler = make_sampler(args.sampler or space.sampler, space, args.seed)
        study = optuna.create_study(storage=storage, study_name=study_name, directions=space.directions,
                                    sampler=sampler, load_if_exists=True)
        if list(study.directions) != [optuna.study.StudyDirection.MINIMIZE if d == "minimize" else
                                      optuna.study.StudyDirection.MAXIMIZE for d in space.directions]:
            raise DSEError(f"study {study_name!r} in {args.storage} has other objectives than {space.path}; "
                           "use another --study-name")
        study.set_metric_names([o.metric for o in space.objectives])
        study.set_user_attr("space", space.name)
        study.set_user_attr("objectives", [o.__dict__ for o in space.objectives])
        study.set_user_attr("constraints", [c.__dict__ for c in space.constraints])
        target = args.n_trials or space.n_trials
        remaining = target - finished_count(study)
        console.print(f"study [bold]{study_name}[/bold] in {args.storage}: {finished_count(study)} finished, "
                      f"{max(0, remaining)} to run")
        if remaining > 0:
            ctx = load_context(space, args)
            baseline = ctx.space.baseline_config().to_dict()
            before = study.user_attrs.get("baseline_config")
            changed = sorted(k for k in baseline if before and k in before and before[k] != baseline[k])
            if changed:
                console.print("[yellow]note:[/yellow] this study's baseline changed since its earlier trials ("
                              + ", ".join(f"{k} {before[k]} -> {baseline[k]}" for k in changed)
                              + "); trials run before and after differ in these knobs, so compare them with "
                                "care or start a new --study-name")
            study.set_user_attr("baseline_config", baseline)
            study.set_user_attr("eval_set", str(Path(args.eval_set or ctx.eval_set).resolve()))
            study.set_user_attr("adapt_set", str(ctx.adapt_fn.manifest) if ctx.adapt_fn else None)
            study.set_user_attr("eval_limit", args.eval_limit or space.eval_limit)
            study.set_user_attr("model", model_identity(ctx.loaded))
            console.print(f"model {ctx.loaded.name} ({ctx.loaded.weights}), {len(ctx.audio.waveforms)} eval utterances"
                          + (f", {len(ctx.audio.skipped)} skipped" if ctx.audio.skipped else ""))
            from optuna.study import MaxTrialsCallback
            from optuna.trial import TrialState
            try:
                study.optimize(make_objective(ctx, console), n_trials=remaining, timeout=args.timeout,
                               catch=(Exception,), gc_after_trial=True,
                               callbacks=[MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED))])
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/yellow]: the trial in flight is recorded as FAIL; "
                              "run the same command again to resume")
                console.print(pareto_table(study, space))
                return 130
    except DSEError as exc:
        return cli_error(exc)
    console.print(pareto_table(study, space))
    return 0


if __name__ == "__main__":
    sys.exit(main())

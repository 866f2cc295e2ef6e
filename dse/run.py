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
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from dse.errors import DSEError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE = f"sqlite:///{PROJECT_ROOT / 'studies.db'}"
HEARTBEAT_S = 20
GRACE_S = 60


def make_storage(url: str):
    import optuna
    import warnings
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    # Workers started together race to create the schema on an empty database; the loser's
    # CREATE fails with a unique violation, and a second attempt finds the tables made.
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as exc:
            if attempt < 4 and type(exc).__name__ in ("IntegrityError", "ProgrammingError", "OperationalError"):
                time.sleep(0.5 + attempt)
                continue
            raise DSEError(f"cannot open storage {url!r}: {type(exc).__name__}: {exc}") from exc


def make_sampler(name: str, space, seed: Optional[int]):
    import optuna

    # Constraints reach the samplers through Trial.set_constraint (see the objective).
    # GP (Gaussian-process Bayesian optimisation, log expected hypervolume improvement,
    # constraints from Trial.set_constraint) is the spaces' default: with 9 trials on a
    # 36-point grid it found more of the front than TPE, and NSGA-II, which needs
    # several generations of a population, did worse than random sampling
    # (benchmarks/search_efficiency.py measures all of them at a 25 % budget).
    startup = max(2, min(10, space.n_trials // 3))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, space.n_trials // 2 or 4)))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise DSEError(f"unknown sampler {name!r}; use gp, tpe, nsga2, random or grid")


def finished_count(study) -> int:
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def pareto_trials(study):
    try:
        return study.best_trials
    except Exception:
        return []


def find_reuse(study, accuracy_key: str) -> Optional[dict]:
    """WER of a completed trial with the same accuracy key (see :mod:`dse.study`), if any."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("accuracy_key") == accuracy_key and t.user_attrs.get("metrics", {}).get("wer") is not None:
            m = t.user_attrs["metrics"]
            return {"wer": m["wer"], "cer": m.get("cer"), "wer_by_slice": t.user_attrs.get("wer_by_slice", {}),
                    "wer_ci95": t.user_attrs.get("wer_ci95"),
                    "utterance_errors": t.user_attrs.get("utterance_errors", []), "trial": t.number}
    return None


def make_objective(ctx, console):
    import optuna

    space = ctx.space

    def objective(trial):
        from dse.study import Pruned, run_trial

        config = None
        try:
            config = space.suggest(trial, levels=not isinstance(trial.study.sampler, optuna.samplers.GridSampler))
            config.validate_for(ctx.loaded.arch)
            trial.set_user_attr("config", config.to_dict())
            trial.set_user_attr("accuracy_key", config.accuracy_key())
            trial.set_user_attr("model", model_identity(ctx.loaded))
            reuse = find_reuse(trial.study, config.accuracy_key()) if ctx.loaded.trained else None

            def on_phase(name):
                console.print(f"  trial {trial.number}: {name}")

            def on_adapt(step, dev_wer):
                console.print(f"  trial {trial.number}: adapt step {step}: dev WER {dev_wer:.3f}")
                reason = prune_reason(space, trial.study, step, dev_wer)
                if reason:
                    raise Pruned(reason)

            console.print(f"[bold]trial {trial.number}[/bold] {describe(config)}"
                          + (f" (WER reused from trial {reuse['trial']})" if reuse else ""))
            record = run_trial(ctx, config, reuse=reuse, on_phase=on_phase, on_adapt_progress=on_adapt)
        except Pruned as exc:
            trial.set_user_attr("prune_reason", str(exc))
            console.print(f"  trial {trial.number}: [yellow]pruned[/yellow]: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted by the user (Ctrl-C)")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason[:2000])
            console.print(f"  trial {trial.number}: [red]failed[/red]: {reason[:300]}")
            raise
        metrics = record["metrics"]
        for key, value in record.items():
            if key != "config":
                trial.set_user_attr(key, value)
        if reuse:
            trial.set_user_attr("reused_wer_from", reuse["trial"])
        violations = [c.violation(metrics.get(c.metric)) for c in space.constraints]
        trial.set_user_attr("constraint_violations", violations)
        for c, v in zip(space.constraints, violations):
            trial.set_constraint(f"{c.metric}<={c.max}" if c.max is not None else f"{c.metric}>={c.min}", v)
        values = []
        for o in space.objectives:
            v = metrics.get(o.metric)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                msg = f"objective {o.metric} was not measured" + (
                    " (random weights: WER is not measurable)" if o.metric in ("wer", "cer") else "")
                trial.set_user_attr("fail_reason", msg)
                raise DSEError(msg)
            values.append(float(v))
        console.print(f"  trial {trial.number}: " + ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(space.objectives, values)))
        return values

    return objective


def prune_reason(space, study, step: int, dev_wer: float) -> Optional[str]:
    """The project's early-stopping rule for adaptation (Optuna's pruners do not work multi-objective)."""
    above = space.prune.get("wer_above")
    if above is not None and dev_wer > above:
        return f"dev WER {dev_wer:.3f} at adaptation step {step} is above the space's limit {above}"
    margin = space.prune.get("front_margin")
    wer_index = next((i for i, o in enumerate(space.objectives) if o.metric == "wer"), None)
    if margin is not None and wer_index is not None:
        front = [t.values[wer_index] for t in pareto_trials(study)]
        if front and dev_wer > max(front) + margin:
            return (f"dev WER {dev_wer:.3f} at adaptation step {step} cannot reach the Pareto front "
                    f"(worst front WER {max(front):.3f} + margin {margin})")
    return None


def model_identity(loaded) -> dict:
    """Which model a trial measured: architecture name, weights source (absolute path) and file hash,
    and the language model available to ``lm_weight`` (absolute path and hash, or ``None``)."""
    from dse.models import file_sha256

    lm = os.path.abspath(loaded.lm_path) if loaded.lm_path else None
    return {"name": loaded.name, "weights": loaded.weights, "sha256": loaded.info.get("checkpoint_sha256"),
            "params": loaded.num_params(), "lm": lm, "lm_sha256": file_sha256(lm) if lm else None}


def describe(config) -> str:
    d = config.to_dict()
    default = type(config)().to_dict()
    changed = {k: v for k, v in d.items() if k != "version" and v != default[k]}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "default configuration"


def pareto_table(study, space):
    from rich.table import Table

    table = Table(title=f"Pareto front of study {study.study_name!r}")
    table.add_column("trial", justify="right")
    table.add_column("configuration")
    for o in space.objectives:
        table.add_column(f"{o.metric} ({o.direction[:3]})", justify="right")
    for col in ("WER", "RTF p95", "speedup", "TTFT s", "MiB"):
        table.add_column(col, justify="right")
    from dse.config import TrialConfig
    for t in sorted(pareto_trials(study), key=lambda t: t.values):
        m = t.user_attrs.get("metrics", {})
        cfg = TrialConfig.from_dict(t.user_attrs["config"])

        def f(v, spec=".4g"):
            return "not measured" if v is None else format(v, spec)
        table.add_row(str(t.number), describe(cfg), *[f(v) for v in t.values], f(m.get("wer"), ".3f"),
                      f(m.get("rtf_p95"), ".4f"), f(m.get("speedup"), ".2f"), f(m.get("ttft_s"), ".3f"),
                      f(m.get("weight_mib"), ".1f"))
    return table


def load_context(space, args):
    from dse.measure import load_eval_audio
    from dse.models import DEFAULT_ADAPT, DEFAULT_EVAL, load_model, random_model, with_lm
    from dse.study import TrialContext

    model_arg = args.model or space.model
    if model_arg == "default":
        loaded = load_model(None, None, args.seed)
    elif model_arg.endswith("-random"):
        loaded = random_model(model_arg[: -len("-random")], args.seed)
    else:
        loaded = load_model(model_arg, None, args.seed)
    loaded = with_lm(loaded, getattr(args, "lm", None))
    space = space.for_model(loaded.lm_path is not None)
    eval_set = args.eval_set or DEFAULT_EVAL
    if not os.path.exists(eval_set):
        raise DSEError(f"eval set {eval_set} not found; pass --eval-set MANIFEST_OR_DIR")
    limit = args.eval_limit or space.eval_limit
    audio = load_eval_audio(eval_set, limit, progress=True)
    adapt_fn = None
    adapt_set = args.adapt_set or DEFAULT_ADAPT
    if loaded.trained and os.path.exists(adapt_set):
        from dse.adapt import Adapter
        adapt_fn = Adapter(loaded, adapt_set, cache_dir=args.cache_dir, device=args.device)
    ctx = TrialContext(loaded=loaded, audio=audio, space=space, adapt_fn=adapt_fn, profile=args.profile)
    ctx.eval_set = str(eval_set)
    return ctx


def main(argv=None) -> int:
    from dse.space import SAMPLERS

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
        from dse.space import load_space

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
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(pareto_table(study, space))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One trial, top-down, and the Optuna plumbing around it.

:func:`run_trial` turns a :class:`~dse.core.config.TrialConfig` into measured metrics
(build -> adapt -> compile -> timed streaming pass with WER -> same-run ratio against
the baseline); :class:`StudyRunner` binds it to an Optuna study whose storage may be
shared by many workers.

Reuse rule: two configurations with the same *accuracy-relevant* knobs
(:func:`dse.core.knobs.accuracy_knobs`: every knob but ``threads`` and ``compile``)
produce the same transcripts, so a trial whose accuracy key matches a completed trial
of the same study copies that trial's WER/CER and streams only
``timing_utterances`` utterances for its timing instead of the whole eval split.

Timing lock: timing on one machine must not overlap, or trials disturb each other's
numbers. Every worker takes an exclusive ``flock`` on one lock file per machine
(``$DSE_LOCK_DIR`` or the system temp folder) around compile, the timed pass and the
baseline ratio; adaptation runs outside the lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dse.core.config import TrialConfig
from dse.core.errors import DSEError
from dse.core.record import TrialRecord
from dse.core.measure import EvalAudio, interleaved_speedup, machine_fingerprint, measure
from dse.core.models import LoadedModel
from dse.search.space import Space
from dse.core.build import Built, build_recognizer


class Pruned(Exception):
    """Adaptation abandoned by the project's early-stopping rule; carries the reason."""


@contextlib.contextmanager
def timing_lock(lock_dir: Optional[str] = None):
    """Exclusive per-machine lock around timed work (blocks until the other worker is done)."""
    folder = Path(lock_dir or os.environ.get("DSE_LOCK_DIR") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "dse-timing.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Phases:
    """Wall time of each named phase of a trial, in seconds, with an optional progress callback."""

    def __init__(self, on_phase: Optional[Callable[[str], None]] = None):
        self.seconds: dict[str, float] = {}
        self.on_phase = on_phase

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.on_phase:
            self.on_phase(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclasses.dataclass
class TrialContext:
    """What a worker loads once and every trial shares."""
    loaded: LoadedModel
    audio: EvalAudio
    space: Space
    adapt_fn: Optional[Callable] = None
    lock_dir: Optional[str] = None
    ratio_utterances: int = 8
    profile: bool = False
    eval_set: Optional[str] = None
    _baseline: Optional[Built] = None
    _baseline_rtf: Optional[float] = None

    @property
    def timing_audio(self) -> EvalAudio:
        n = self.space.timing_utterances
        a = self.audio
        return EvalAudio(a.ids[:n], a.waveforms[:n], a.texts[:n], a.slices[:n], [])

    def baseline(self) -> Built:
        if self._baseline is None:
            self._baseline = build_recognizer(self.loaded, self.space.baseline_config())
        return self._baseline

    def baseline_rtf(self) -> float:
        """The baseline's mean RTF on the timing utterances, measured once per worker."""
        if self._baseline_rtf is None:
            with timing_lock(self.lock_dir):
                self._baseline_rtf = measure(self.baseline().recognizer, self.timing_audio, accuracy=False)["rtf_mean"]
        return self._baseline_rtf


def run_trial(ctx: TrialContext, config: TrialConfig, reuse: Optional[dict] = None,
              on_phase: Optional[Callable[[str], None]] = None,
              on_adapt_progress: Optional[Callable[[int, float], None]] = None) -> TrialRecord:
    """Build, adapt, time and score ``config``; returns its record (metrics, phases, extras).

    An edit that invalidates the weights (MoE, frame width) with ``adapt_steps == 0`` is
    measured as it is: an honest point showing what the edit costs without adaptation.

    ``reuse``: WER/CER (and per-slice WER) of an earlier trial with the same accuracy key.
    ``on_adapt_progress(step, dev_wer)`` may raise :class:`Pruned` to stop the adaptation.
    """
    phases = Phases(on_phase)
    if config.adapt_steps > 0 and ctx.adapt_fn is None:
        raise DSEError("adapt_steps > 0 but this worker has no adaptation split (trained weights and an adapt manifest)")

    def adapt_fn(edited, cfg):
        with phases("adapt"):
            return ctx.adapt_fn(edited, cfg, on_progress=on_adapt_progress)
    with phases("build"):
        built = build_recognizer(ctx.loaded, config, adapt_fn=adapt_fn, warmup_audio=None)
    if "adapt" in phases.seconds:
        phases.seconds["build"] -= phases.seconds["adapt"]
    torch.set_num_threads(built.config.threads)
    with timing_lock(ctx.lock_dir):
        if built.compile_s is not None:
            phases.seconds["compile"] = built.compile_s
            phases.seconds["build"] -= built.compile_s
        audio = ctx.timing_audio if reuse else ctx.audio
        accuracy = ctx.loaded.trained and not reuse
        with phases("measure"):
            result = measure(built.recognizer, audio, accuracy=accuracy)
        with phases("baseline"):
            base = ctx.baseline()
            ratio = interleaved_speedup(built.recognizer, base.recognizer, ctx.timing_audio,
                                        limit=ctx.ratio_utterances)
        profile = None
        if ctx.profile:
            with phases("profile"):
                profile = operator_profile(built.recognizer, ctx.timing_audio.waveforms[0])
    if reuse:
        result.update({k: reuse.get(k) for k in ("wer", "cer", "wer_by_slice", "wer_ci95")})
    from dse.core.cost import flops_per_chunk

    metrics = {k: result.get(k) for k in (
        "wer", "cer", "rtf_mean", "rtf_p50", "rtf_p95", "chunk_latency_p50_ms", "chunk_latency_p95_ms",
        "chunk_latency_p99_ms", "ttft_s", "ttft_p95_s", "peak_rss_mib", "rss_delta_mib")}
    metrics.update({
        "weight_mib": built.weight_mib, "params": built.params, "speedup": ratio["speedup"],
        "compile_s": built.compile_s,
        "flops_per_chunk": flops_per_chunk(built.loaded.arch, built.config, built.loaded.tokenizer.num_symbols)["total"],
    })
    metrics["rtf_normalised"] = ctx.baseline_rtf() / ratio["speedup"]
    return TrialRecord(
        config=built.config.to_dict(), metrics=metrics, phases_s=phases.seconds, speedup=ratio,
        rtf_mean_ci95=result["rtf_mean_ci95"], wer_ci95=result.get("wer_ci95"),
        wer_by_slice=result.get("wer_by_slice", {}),
        utterance_errors=reuse.get("utterance_errors", []) if reuse else
        [[t["errors"], t["words"]] for t in result.get("transcripts") or []],
        utterances_timed=result["utterances"], audio_s=result["audio_s"],
        spread_warning=result.get("spread_warning"), skipped=result.get("skipped", []),
        transcripts=(result.get("transcripts") or [])[:12], adapt=built.adapt_info,
        machine=machine_fingerprint(), profile=profile)


def operator_profile(recognizer, waveform: torch.Tensor, top: int = 15) -> list[dict]:
    """Top operators by self CPU time while streaming one utterance."""
    from torch.profiler import ProfilerActivity, profile

    recognizer.transcribe(waveform)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        recognizer.transcribe(waveform)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in rows]


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
    """WER of a completed trial with the same accuracy key (see :mod:`dse.search.study`), if any."""
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
            record.accuracy_key = config.accuracy_key()
            record.model = model_identity(ctx.loaded)
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
        metrics = record.metrics
        if reuse:
            record.reused_wer_from = reuse["trial"]
        violations = [c.violation(metrics.get(c.metric)) for c in space.constraints]
        record.constraint_violations = violations
        for key, value in record.to_user_attrs().items():
            if key != "config":
                trial.set_user_attr(key, value)
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
    from dse.core.models import file_sha256

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
    from dse.core.config import TrialConfig
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
    from dse.core.measure import load_eval_audio
    from dse.core.models import DEFAULT_ADAPT, DEFAULT_EVAL, load_model, random_model, with_lm

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
        from dse.search.adapt import Adapter
        adapt_fn = Adapter(loaded, adapt_set, cache_dir=args.cache_dir, device=args.device)
    ctx = TrialContext(loaded=loaded, audio=audio, space=space, adapt_fn=adapt_fn, profile=args.profile)
    ctx.eval_set = str(eval_set)
    return ctx

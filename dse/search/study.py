"""One trial, top-down, and the Optuna plumbing around it.

:func:`run_trial` turns a :class:`~dse.core.config.TrialConfig` into measured metrics
(build -> adapt -> compile -> timed streaming pass with WER -> same-run ratio against
the baseline); :func:`make_objective` binds it to an Optuna study whose storage may be
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
from dse.core.errors import DSEError, not_empty
from dse.core.record import STORED_METRICS, TrialRecord
from dse.core.interrupts import INTERRUPTS
from dse.search.storage import STALE_REASON
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
              on_adapt_progress: Optional[Callable[..., None]] = None,
              on_speed_probe: Optional[Callable[[dict], None]] = None) -> TrialRecord:
    """Build, adapt, time and score ``config``; returns its record (metrics, phases, extras).

    An edit that invalidates the weights (MoE, frame width) with ``adapt_steps == 0`` is
    measured as it is: an honest point showing what the edit costs without adaptation.

    ``reuse``: WER/CER (and per-slice WER) of an earlier trial with the same accuracy key.
    ``on_adapt_progress(step, dev_wer, dev_errors)`` may raise :class:`Pruned` to stop the adaptation.
    ``on_speed_probe(ratio)``: before adapting, the configuration's speed is measured on its
    un-adapted weights (the same architecture and precision stream at the same speed; the
    early stop weighs a candidate's accuracy against it), the same-run ratio against the
    baseline (:func:`dse.core.measure.interleaved_speedup`).
    """
    phases = Phases(on_phase)
    if config.adapt_steps > 0 and ctx.adapt_fn is None:
        raise DSEError("adapt_steps > 0 but this worker has no adaptation split (trained weights and an adapt manifest)")

    if config.adapt_steps > 0 and on_speed_probe is not None:
        with phases("speed probe"):
            unadapted = build_recognizer(ctx.loaded, config.replace(adapt_steps=0))
            torch.set_num_threads(unadapted.config.threads)
            with timing_lock(ctx.lock_dir):
                ratio = interleaved_speedup(unadapted.recognizer, ctx.baseline().recognizer, ctx.timing_audio,
                                            limit=ctx.ratio_utterances)
            del unadapted
        on_speed_probe(ratio)

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
        if built.export_s:  # the encoder's ONNX export (backend onnxruntime), its own phase
            phases.seconds["export"] = built.export_s
            phases.seconds["build"] -= built.export_s
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

    metrics = {k: result.get(k) for k in STORED_METRICS}  # the pass's own; the build's and the ratio's below
    metrics.update({
        "weight_mib": built.weight_mib, "params": built.params, "speedup": ratio["speedup"],
        "compile_s": built.compile_s, "export_s": built.export_s,
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
        load_warning=result.get("load_warning"), threading=result.get("threading"),
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
        return _grid_sampler(space.grid(), seed)
    raise DSEError(f"unknown sampler {name!r}; use gp, tpe, nsga2, random or grid")


def _grid_sampler(grid: dict, seed: Optional[int]):
    """Optuna's ``GridSampler``, which also accepts a queued trial (the baseline, the anchors, an
    unmeasured configuration after a duplicate): such a trial's point is marked visited, so the
    sampler neither proposes it again nor fails when the study ends (Optuna 5 leaves a queued
    trial without a grid id, and its ``after_trial`` then raises ``KeyError``)."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def before_trial(self, study, trial):
            fixed = trial.system_attrs.get("fixed_params")
            if fixed is not None and "grid_id" not in trial.system_attrs:
                point = tuple(fixed.get(n) for n in self._param_names)
                if point in self._all_grids:
                    study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
                    study._storage.set_trial_system_attr(trial._trial_id, "grid_id", self._all_grids.index(point))
                    return
            if fixed is None and "grid_id" not in trial.system_attrs:
                unvisited = self._get_unvisited_grid_ids(study)  # never a point a queued trial took
                if unvisited:
                    study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
                    study._storage.set_trial_system_attr(trial._trial_id, "grid_id",
                                                         int(self._rng.rng.choice(unvisited)))
                    return
            super().before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            if "grid_id" not in study._storage.get_trial_system_attrs(trial._trial_id):
                if not self._get_unvisited_grid_ids(study):  # a queued point outside the grid
                    study.stop()
                return
            super().after_trial(study, trial, state, values)

    return GridSampler(grid, seed=seed)


FINISHED_NOTE = ("a trial is finished when COMPLETE or PRUNED by the early stop; a repeat proposal "
                 "(duplicate_of) is pruned in seconds and does not count")


def is_duplicate(t) -> bool:
    return t.user_attrs.get("duplicate_of") is not None


def finished_count(study) -> int:
    """Distinct configurations the study has finished (see :data:`FINISHED_NOTE`)."""
    from optuna.trial import TrialState
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
               if not is_duplicate(t))


def baseline_trial(study):
    """The study's baseline trial (the first COMPLETE trial enqueued as the baseline), or ``None``."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("anchor") == "baseline":
            return t
    return None


INTERRUPTED = "interrupted by the user (Ctrl-C or SIGTERM)"
# failures of the worker, not of the configuration: such a trial is tried again
RETRIED_FAILURES = (INTERRUPTED, STALE_REASON)


def claimed_keys(study, exclude: Optional[int] = None) -> dict[str, int]:
    """Configuration key -> trial number of every configuration measured, being measured or
    queued (COMPLETE, PRUNED by the early stop, RUNNING, WAITING), or that failed for a reason
    of its own (a failure is not retried; an interrupted or abandoned trial is), duplicates left out.
    Where several trials hold one key, the lowest-numbered holds it: two workers that draw the same
    configuration at once agree on which of them measures it (see :func:`repeat_of`)."""
    from optuna.trial import TrialState
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                      TrialState.WAITING, TrialState.FAIL)):
        if t.number == exclude or is_duplicate(t):
            continue
        if t.state == TrialState.FAIL and (not t.user_attrs.get("fail_reason")
                                           or t.user_attrs["fail_reason"].startswith(RETRIED_FAILURES)):
            continue
        key = t.user_attrs.get("config_key") or (t.user_attrs.get("dse_config") or {}).get("_key")
        if key and (key not in out or t.number < out[key]):
            out[key] = t.number
    return out


def repeat_of(study, trial_number: int, key: str) -> Optional[int]:
    """The trial that already holds configuration ``key``, if it is not trial ``trial_number`` itself.

    Only a lower-numbered trial counts. A trial records its key before it looks, so of two trials
    that claim one key at the same moment, each sees the other, and only the higher-numbered one
    steps aside: the configuration is measured exactly once, never zero times."""
    twin = claimed_keys(study, exclude=trial_number).get(key)
    return twin if twin is not None and twin < trial_number else None


def enqueue_configuration(study, space, config, levels: bool, anchor: Optional[str] = None) -> None:
    """Queue ``config`` as the study's next trial: under the Optuna parameters that give it (so the
    sampler sees a regular point), with the configuration itself in ``dse_config``."""
    params = space.params_for(config, levels=levels)
    attrs = {"dse_config": dict(config.to_dict(), _key=config.key(), _in_space=params is not None)}
    params = params or {}
    if anchor:
        attrs["anchor"] = anchor
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)


def enqueue_anchors(study, space, levels: bool, log=lambda msg: None) -> list[str]:
    """The baseline, then the space's anchors, queued once per study (a resumed study does not
    queue them again); a configuration already measured is not queued. Returns what was queued."""
    if study.user_attrs.get("anchors_enqueued"):
        return []
    claimed = claimed_keys(study)
    queued = []
    for name, cfg in [("baseline", space.baseline_config())] + [
            (f"anchor {i}", c) for i, c in enumerate(space.anchor_configs())]:
        if cfg.key() in claimed:
            continue
        claimed[cfg.key()] = -1
        enqueue_configuration(study, space, cfg, levels, anchor=name)
        queued.append(f"{name}: {describe(cfg)}")
    study.set_user_attr("anchors_enqueued", True)
    for q in queued:
        log(f"queued {q}")
    return queued


def enqueue_unmeasured(study, space, levels: bool, rng) -> Optional[object]:
    """Queue a configuration of the space that no trial has claimed (drawn at random), so that a
    sampler repeating itself cannot stall the study; ``None`` when the space is exhausted."""
    claimed = claimed_keys(study)
    if space.grid_size() <= 20000:  # a bound on listing the space (a choice, not a measurement)
        left = [c for c in space.configurations() if c.key() not in claimed]
        cfg = rng.choice(left) if left else None
    else:  # too many to list: draw points until one is new. A study claims a few hundred of over
        # 20,000 configurations, so 1,000 draws all landing on claimed ones (probability
        # (claimed / size) ** 1000) does not happen in practice.
        cfg = next((c for c in (space.random_configuration(rng) for _ in range(1000))
                    if c is not None and c.key() not in claimed), None)
    if cfg is not None:
        enqueue_configuration(study, space, cfg, levels)
    return cfg


def queue_after_repeat(study, space, levels: bool, rng) -> tuple[Optional[object], bool]:
    """After a trial stepped aside as a repeat: ``(configuration queued in its place, exhausted)``.

    When every configuration is claimed, nothing is queued; the space is exhausted only if no
    claimed one is still waiting for a worker. Otherwise the queued ones are what is left: with
    several workers, one that drew a repeat while another's queued configuration waited would
    otherwise stop them all, and that configuration would never be measured."""
    from optuna.trial import TrialState

    nxt = enqueue_unmeasured(study, space, levels, rng)
    if nxt is not None:
        return nxt, False
    return None, not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


class DistinctTrials:
    """Optuna callback: stop once the study holds ``target`` distinct finished configurations,
    or when the space is exhausted (:func:`queue_after_repeat`: nothing left to queue, and nothing
    queued still waiting for a worker)."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study, trial) -> None:
        if finished_count(study) >= self.target or study.user_attrs.get("exhausted"):
            study.stop()


def _dev_errors_key(config) -> str:
    # what the dev measurement depends on: the weights and the geometry (greedy, fp32, torch)
    return config.replace(precision="fp32", backend="torch", compile="off", threads=2, beam_width=1, lm_weight=0.0,
                          temperature=1.0).key()


class DevReference:
    """The early stop's yardstick: the dev measurement (greedy, fp32, the adapt split's dev
    utterances; the measurement adaptation itself makes at each check) of the baseline and of
    each front member, measured once per weights and stored on the study (``dev_measurements``)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def errors(self, study, config) -> Optional[list]:
        from dse.core.build import edit_architecture
        from dse.core.rnnt import streaming_wer

        config = config.resolved(self.ctx.loaded.arch) if self.ctx is not None else config
        key = _dev_errors_key(config)
        stored = dict(study.user_attrs.get("dev_measurements") or {})
        if key in stored:
            return stored[key]
        adapter = self.ctx.adapt_fn
        if adapter is None:
            return None
        if config.adapt_steps > 0:  # adapted weights: their last check is this very measurement
            state, info = adapter(edit_architecture(self.ctx.loaded, config), config)
            errors = info.get("final_dev_errors")
        else:
            edited = edit_architecture(self.ctx.loaded, config)
            dev_utts = adapter._load_audio()[0]
            errors = streaming_wer(edited, dev_utts, beam_width=1)["utterance_errors"]
        if errors is not None:
            stored[key] = errors
            study.set_user_attr("dev_measurements", stored)
        return errors


def prune_reason(space, study, step: int, dev_wer: float, dev_errors: Optional[list] = None,
                 speed: Optional[dict] = None, reference: Optional[DevReference] = None) -> Optional[str]:
    """The project's early stop for adaptation (Optuna's pruners do not work multi-objective).

    At a check, the candidate's dev measurement is compared with the *same* measurement of
    every member of the current front (the baseline included): it is stopped when a member
    at least as fast as the candidate (its same-run speedup against the baseline at or above
    the candidate's lower bound, measured before adapting) is ahead of it on the dev
    utterances by more than ``front_margin`` beyond the paired noise (the lower end of the
    paired bootstrap interval above the margin). ``wer_above`` stops any candidate whose dev
    WER is above it."""
    above = space.prune.get("wer_above")
    if above is not None and dev_wer > above:
        return f"dev WER {dev_wer:.3f} at adaptation step {step} is above the space's limit {above}"
    margin = space.prune.get("front_margin")
    if margin is None or dev_errors is None or speed is None or reference is None:
        return None
    from dse.core.config import TrialConfig
    from dse.core.measure import paired_wer_difference
    from dse.search.front import noisy_front

    points = front_points(study, space)
    if not points:
        return None
    front = noisy_front(points)
    cand_lo = speed["speedup_ci95"][0]
    for number in front.members:
        p = front.points[number]
        if p.speedup < cand_lo:
            continue
        member = study.trials[number]
        ref = reference.errors(study, TrialConfig.from_dict(TrialRecord.of_trial(member).config))
        if not ref or len(ref) != len(dev_errors):
            continue
        diff, lo, hi = paired_wer_difference([tuple(e) for e in dev_errors], [tuple(e) for e in ref])
        if lo > margin:
            return (f"at adaptation step {step} the dev WER {dev_wer:.3f} is {100 * diff:.1f} pts "
                    f"[{100 * lo:.1f}, {100 * hi:.1f}] behind front trial {number} (same dev utterances, greedy, "
                    f"fp32), which is at least as fast ({p.speedup:.2f}x against the candidate's "
                    f"{speed['speedup']:.2f}x [{cand_lo:.2f}, {speed['speedup_ci95'][1]:.2f}]): beyond the margin "
                    f"{100 * margin:.0f} pts, it cannot reach the front")
    return None


def front_points(study, space) -> list:
    """The study's completed trials as :class:`dse.search.front.Point` (duplicates left out)."""
    from optuna.trial import TrialState

    from dse.core.config import TrialConfig
    from dse.search.front import point_from_record

    base = baseline_trial(study)
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):  # a repeat is PRUNED, never here
        record = TrialRecord.of_trial(t)
        if not (record.speedup or {}).get("speedup"):
            continue
        ok = all(v <= 0 for v in record.constraint_violations or [])
        out.append(point_from_record(t.number, record, base.number if base else None, ok,
                                     describe(TrialConfig.from_dict(record.config))))
    return out


def find_reuse(study, accuracy_key: str) -> Optional[dict]:
    """WER of a completed trial with the same accuracy key (see :mod:`dse.search.study`), if any."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = TrialRecord.of_trial(t)
        if record.accuracy_key == accuracy_key and record.metrics.get("wer") is not None:
            m = record.metrics
            return {"wer": m["wer"], "cer": m.get("cer"), "wer_by_slice": record.wer_by_slice,
                    "wer_ci95": record.wer_ci95, "utterance_errors": record.utterance_errors, "trial": t.number}
    return None


def make_objective(ctx, console, seed: Optional[int] = None):
    """The study's objective: one distinct configuration per finished trial (see :data:`FINISHED_NOTE`)."""
    import random

    import optuna

    space = ctx.space
    rng = random.Random(seed)
    reference = DevReference(ctx)
    identity = model_identity(ctx.loaded)  # hashes the LM file: once per worker, not per trial

    def step_aside_if_repeat(trial, config, levels: bool) -> None:
        """Prune ``trial`` as a repeat if a lower-numbered trial holds its configuration, and queue
        an unmeasured one in its place. Checked on entry, at each adaptation check and before the
        result is recorded (never under the timing lock, where other workers wait): a worker that
        drew the configuration a moment before this one, but recorded it a moment after this one
        looked, is still seen, and the configuration is recorded once."""
        twin = repeat_of(trial.study, trial.number, config.key())
        if twin is None:
            return
        trial.set_user_attr("duplicate_of", twin)
        nxt, exhausted = queue_after_repeat(trial.study, space, levels, rng)
        if exhausted:
            trial.study.set_user_attr("exhausted", True)
            trial.study.stop()
            console.print(f"  trial {trial.number}: {describe(config)} repeats trial {twin}; the space is "
                          f"exhausted (every configuration of {space.name} has been measured)")
        elif nxt is None:
            console.print(f"  trial {trial.number}: repeats trial {twin} ({describe(config)}); what is left of "
                          f"the space is queued")
        else:
            console.print(f"  trial {trial.number}: repeats trial {twin} ({describe(config)}); queued an "
                          f"unmeasured configuration instead: {describe(nxt)}")
        raise optuna.TrialPruned(f"duplicate of trial {twin}")

    def objective(trial):
        try:
            with INTERRUPTS.raised():  # a signal held while Optuna started this trial lands here
                return work(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", INTERRUPTED)
            raise

    def work(trial):
        from dse.core.config import TrialConfig

        levels = not isinstance(trial.study.sampler, optuna.samplers.GridSampler)
        config = None
        try:
            queued = trial.user_attrs.get("dse_config")
            if queued:  # the baseline, an anchor, or an unmeasured configuration queued after a repeat
                if queued.get("_in_space", True):
                    space.suggest(trial, levels=levels)  # its parameters, for the sampler's model
                config = TrialConfig.from_dict({k: v for k, v in queued.items() if not k.startswith("_")})
            else:
                config = space.suggest(trial, levels=levels)
            config.validate_for(ctx.loaded.arch)
            trial.set_user_attr("config", config.to_dict())
            trial.set_user_attr("config_key", config.key())
            trial.set_user_attr("accuracy_key", config.accuracy_key())
            trial.set_user_attr("model", identity)
            step_aside_if_repeat(trial, config, levels)
            reuse = find_reuse(trial.study, config.accuracy_key()) if ctx.loaded.trained else None
            probe: dict = {}

            def on_phase(name):
                console.print(f"  trial {trial.number}: {name}")

            def on_speed(ratio):
                probe.update(ratio)
                trial.set_user_attr("speed_before_adapting", ratio)

            def on_adapt(step, dev_wer, dev_errors=None):
                step_aside_if_repeat(trial, config, levels)  # the long phase: look again (not under the timing lock)
                console.print(f"  trial {trial.number}: adapt step {step}: dev WER {dev_wer:.3f}")
                reason = prune_reason(space, trial.study, step, dev_wer, dev_errors, probe or None, reference)
                if reason:
                    raise Pruned(reason)

            label = trial.user_attrs.get("anchor")
            console.print(f"[bold]trial {trial.number}[/bold] {describe(config)}"
                          + (f" ({label})" if label else "")
                          + (f" (WER reused from trial {reuse['trial']})" if reuse else ""))
            record = run_trial(ctx, config, reuse=reuse, on_phase=on_phase, on_adapt_progress=on_adapt,
                               on_speed_probe=on_speed)
            record.accuracy_key = config.accuracy_key()
            record.model = identity
            step_aside_if_repeat(trial, config, levels)
        except optuna.TrialPruned:
            raise
        except Pruned as exc:
            trial.set_user_attr("prune_reason", str(exc))
            console.print(f"  trial {trial.number}: [yellow]pruned[/yellow]: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
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
                msg = f"objective {o.metric} was not measured"  # (random weights with WER: refused up front)
                trial.set_user_attr("fail_reason", msg)
                console.print(f"  trial {trial.number}: [red]failed[/red]: {msg}")
                raise DSEError(msg)
            values.append(float(v))
        console.print(f"  trial {trial.number}: " + ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(space.objectives, values))
                      + f", speedup {record.speedup['speedup']:.2f}x")
        return values

    return objective


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


def resolve_front(study, ctx, console) -> None:
    """Re-measure the speed of front pairs the noise leaves open, interleaved against each other
    (``ctx.space.remeasure``: at most ``pairs`` pairs, ``utterances`` utterances each), and store
    each pair's ratio on the study (``pair_speedups``) for the front to use."""
    from dse.core.config import TrialConfig
    from dse.search.front import noisy_front, undecided_pairs

    budget = ctx.space.remeasure
    stored = dict(study.user_attrs.get("pair_speedups") or {})
    points = front_points(study, ctx.space)
    if not points or not budget.get("pairs"):
        return
    done = 0
    for a, b in undecided_pairs(noisy_front(points, stored), stored):
        if done >= budget["pairs"]:
            break
        if f"{a}-{b}" in stored or f"{b}-{a}" in stored:
            continue
        console.print(f"re-measuring trials {a} and {b} against each other (the noise leaves their order open)")
        built = {}
        for n in (a, b):
            cfg = TrialConfig.from_dict(TrialRecord.of_trial(study.trials[n]).config)
            built[n] = build_recognizer(ctx.loaded, cfg, adapt_fn=ctx.adapt_fn)
        torch.set_num_threads(built[a].config.threads)
        with timing_lock(ctx.lock_dir):
            ratio = interleaved_speedup(built[a].recognizer, built[b].recognizer, ctx.audio,
                                        limit=budget.get("utterances", 8))
        stored[f"{a}-{b}"] = ratio
        study.set_user_attr("pair_speedups", stored)
        console.print(f"  trial {a} is {ratio['speedup']:.3f}x [{ratio['speedup_ci95'][0]:.3f}, "
                      f"{ratio['speedup_ci95'][1]:.3f}] the speed of trial {b}")
        done += 1


def study_front(study, space):
    """(front, baseline trial number or None, all points) of a study, under noise."""
    from dse.search.front import noisy_front

    points = front_points(study, space)
    base = baseline_trial(study)
    return noisy_front(points, study.user_attrs.get("pair_speedups")), (base.number if base else None), points


def pareto_table(study, space):
    """The front under noise (the baseline always shown), with each member's speedup and WER
    difference against the baseline, their intervals, and the recommendation under it."""
    from rich.table import Table

    from dse.search.front import compare

    front, base_number, points = study_front(study, space)
    table = Table(title=f"Pareto front of study {study.study_name!r} (decided under noise)")
    table.add_column("trial", justify="right")
    table.add_column("configuration")
    for o in space.objectives:
        table.add_column(f"{o.metric} ({o.direction[:3]})", justify="right")
    for col in ("WER", "vs baseline (pts)", "speedup [95% CI]", "RTF p95", "TTFT s", "MiB", "note"):
        table.add_column(col, justify="right")
    shown = list(front.members)
    if base_number is not None and base_number not in shown:
        shown.append(base_number)
    for number in shown:
        t = study.trials[number]
        record = TrialRecord.of_trial(t)
        p = front.points[number]
        m = record.metrics

        def f(v, spec=".4g"):
            return "not measured" if v is None else format(v, spec)
        diff = ""
        if base_number is not None and number != base_number:
            c = compare(p, front.points[base_number], study.user_attrs.get("pair_speedups"))
            if c.wer_diff is not None:
                diff = f"{100 * c.wer_diff:+.1f}" + (f" [{100 * c.wer_diff_ci95[0]:+.1f}, {100 * c.wer_diff_ci95[1]:+.1f}]"
                                                    if c.wer_diff_ci95 else "")
        notes = []
        if number == base_number:
            notes.append("baseline")
        if number in front.dominated:
            notes.append(f"dominated by {front.dominated[number]}")
        if front.is_undecided(number):
            notes.append("undecided")
        if not p.limits_ok:
            notes.append("outside limits")
        if record.load_warning:
            notes.append("machine busy")
        table.add_row(str(number), p.description, *[f(v) for v in (t.values or [])], f(m.get("wer"), ".3f"), diff,
                      f"{p.speedup:.2f} [{p.speedup_ci95[0]:.2f}, {p.speedup_ci95[1]:.2f}]",
                      f(m.get("rtf_p95"), ".4f"), f(m.get("ttft_s"), ".3f"), f(m.get("weight_mib"), ".1f"),
                      ", ".join(notes))
    return table


def study_summary(study, space) -> list[str]:
    """What the study found, in words (:func:`dse.search.front.summary`)."""
    from dse.search.front import summary

    front, base_number, points = study_front(study, space)
    if base_number is None:
        return ["the baseline has not been measured yet: no recommendation"] if points else []
    lines = summary(front, base_number, points, study.user_attrs.get("pair_speedups"))
    busy = [p.trial for p in points if TrialRecord.of_trial(study.trials[p.trial]).load_warning]
    if busy:
        lines.append(f"warning: the machine was busy while trial(s) {', '.join(map(str, busy))} were timed (another "
                     "process used the CPU); their speeds may be wrong by far more than their intervals say: stop "
                     "other work and run the study again with a new --study-name")
    return lines


def eval_set_of(args) -> str:
    """The eval set a worker uses (``--eval-set`` or the shipped split), checked to exist."""
    from dse.core.models import DEFAULT_EVAL

    eval_set = not_empty(args.eval_set, "--eval-set", "a JSONL manifest or a LibriSpeech directory") or DEFAULT_EVAL
    if not os.path.exists(eval_set):
        raise DSEError(f"eval set {eval_set} not found; pass --eval-set MANIFEST_OR_DIR")
    return str(eval_set)


def adapt_set_of(args) -> Optional[str]:
    """The adaptation split a worker uses: ``--adapt-set``, checked to exist, or the shipped split
    where it is present (``None`` where it is not)."""
    from dse.core.models import DEFAULT_ADAPT

    given = not_empty(getattr(args, "adapt_set", None), "--adapt-set", "the manifest of the adaptation split")
    if given is None:
        return str(DEFAULT_ADAPT) if os.path.exists(DEFAULT_ADAPT) else None
    if not os.path.isfile(given):
        raise DSEError(f"adapt set {given} not found (or not a file); pass --adapt-set MANIFEST")
    return given


def resume_conflicts(study, space, levels: bool) -> list[str]:
    """Why ``space`` cannot go on with ``study``'s trials, one line per knob (empty: it can).

    Optuna refuses another kind of parameter, or other choices for a categorical one (every
    new trial would fail); and an ordered knob's level (see :meth:`Space.suggest`) would
    silently mean another value where a choice was inserted or removed below it: each earlier
    trial's parameters are replayed through today's space and must give its recorded values."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    params = {p.optuna_name(levels): p for p in space.params}
    problems: dict[str, str] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            p = params.get(name)
            if p is None or p.knob in problems:
                continue
            categorical = p.choices is not None and not p.as_level(levels)
            if isinstance(dist, CategoricalDistribution) != categorical:
                problems[p.knob] = (f"{p.knob}: searched as {'a range' if categorical else 'choices'} then, "
                                    f"as {'choices' if categorical else 'a range'} now")
            elif categorical and list(dist.choices) != list(p.choices):
                problems[p.knob] = f"{p.knob}: {list(dist.choices)} then, {list(p.choices)} now"
        recorded = t.user_attrs.get("config")
        replay = [p for p in space.params if p.as_level(levels) and p.level_name in t.params and p.knob not in problems]
        if not recorded or not replay:
            continue
        try:
            now = space.suggest(optuna.trial.FixedTrial(t.params), levels=levels).to_dict()
        except IndexError:  # a level past today's choices: some were removed
            for p in replay:
                if t.params[p.level_name] >= len(p.choices):
                    problems[p.knob] = f"{p.knob}: trial {t.number}'s level {t.params[p.level_name]} has no value now"
            continue
        except Exception:  # a parameter today's space has and this trial lacks (a knob added): nothing to replay
            continue
        for p in replay:
            if p.knob in recorded and now.get(p.knob) != recorded[p.knob]:
                problems[p.knob] = (f"{p.knob}: trial {t.number}'s level {t.params[p.level_name]} gave "
                                    f"{recorded[p.knob]}, now it gives {now.get(p.knob)}")
    return list(problems.values())


def load_worker_model(space, args):
    """The model a worker measures (``--model`` or the space's), with its language model; the
    space is checked against it before any trial (:meth:`dse.search.space.Space.check_for`)."""
    from dse.core.models import load_model, random_model, with_lm

    model_arg = args.model or space.model
    weights_seed = 0  # random weights are the same in every worker (--seed is the sampler's)
    if model_arg == "default":
        loaded = load_model(None, None, weights_seed)
    elif model_arg.endswith("-random"):
        loaded = random_model(model_arg[: -len("-random")], weights_seed)
    else:
        loaded = load_model(model_arg, None, weights_seed)
    loaded = with_lm(loaded, getattr(args, "lm", None))
    space.check_for(loaded.arch, loaded.lm_path is not None)
    space.check_weights(model_arg, loaded.trained, loaded.trained and adapt_set_of(args) is not None)
    device = getattr(args, "device", "cpu")
    if device != "cpu" and space.adapts() and not torch.cuda.is_available():  # the device adapts, nothing else
        raise DSEError(f"--device {device}: this machine has no CUDA device torch can use; adapt on cpu")
    return loaded


def load_context(space, args, loaded=None):
    from dse.core.measure import load_eval_audio

    loaded = loaded or load_worker_model(space, args)
    space = space.for_model(loaded.lm_path is not None)
    eval_set = eval_set_of(args)
    limit = args.eval_limit or space.eval_limit
    audio = load_eval_audio(eval_set, limit, progress=True)
    adapt_fn = None
    adapt_set = adapt_set_of(args)
    if loaded.trained and adapt_set is not None:
        from dse.search.adapt import Adapter
        adapt_fn = Adapter(loaded, adapt_set, cache_dir=args.cache_dir, device=args.device)
    ctx = TrialContext(loaded=loaded, audio=audio, space=space, adapt_fn=adapt_fn, profile=args.profile)
    ctx.eval_set = str(eval_set)
    return ctx

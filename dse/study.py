"""One trial, top-down, and the Optuna plumbing around it.

:func:`run_trial` turns a :class:`~dse.config.TrialConfig` into measured metrics
(build -> adapt -> compile -> timed streaming pass with WER -> same-run ratio against
the baseline); :class:`StudyRunner` binds it to an Optuna study whose storage may be
shared by many workers.

Reuse rule: two configurations with the same *accuracy-relevant* knobs
(:data:`dse.config.ACCURACY_KNOBS`: everything except ``threads`` and ``compile``)
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
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dse.config import TrialConfig
from dse.errors import DSEError
from dse.measure import EvalAudio, interleaved_speedup, machine_fingerprint, measure
from dse.models import LoadedModel
from dse.space import Space
from dse.transforms import Built, build_recognizer


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
              on_adapt_progress: Optional[Callable[[int, float], None]] = None) -> dict:
    """Build, adapt, time and score ``config``; returns a record of metrics, phases and extras.

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
    from dse.cost import flops_per_chunk

    metrics = {k: result.get(k) for k in (
        "wer", "cer", "rtf_mean", "rtf_p50", "rtf_p95", "chunk_latency_p50_ms", "chunk_latency_p95_ms",
        "chunk_latency_p99_ms", "ttft_s", "ttft_p95_s", "peak_rss_mib")}
    metrics.update({
        "weight_mib": built.weight_mib, "params": built.params, "speedup": ratio["speedup"],
        "compile_s": built.compile_s,
        "flops_per_chunk": flops_per_chunk(built.loaded.arch, built.config, built.loaded.tokenizer.num_symbols)["total"],
    })
    metrics["rtf_normalised"] = ctx.baseline_rtf() / ratio["speedup"]
    return {
        "config": built.config.to_dict(), "metrics": metrics, "phases_s": phases.seconds,
        "speedup": ratio, "rtf_mean_ci95": result["rtf_mean_ci95"], "wer_ci95": result.get("wer_ci95"),
        "wer_by_slice": result.get("wer_by_slice", {}),
        # per eval utterance (errors, reference words): two trials compare utterance by utterance
        "utterance_errors": reuse.get("utterance_errors", []) if reuse else
        [[t["errors"], t["words"]] for t in result.get("transcripts") or []],
        "utterances_timed": result["utterances"], "audio_s": result["audio_s"],
        "spread_warning": result.get("spread_warning"), "skipped": result.get("skipped", []),
        "transcripts": (result.get("transcripts") or [])[:12], "adapt": built.adapt_info,
        "machine": machine_fingerprint(), "profile": profile,
    }


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

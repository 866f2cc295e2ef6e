"""Honest measurement of a streaming recognizer: ``python -m dse.measure``.

Every figure comes from one pass of the real streaming path: audio is fed in the
pieces a live stream would deliver, each chunk is timed with ``perf_counter_ns``
after a warm-up utterance that is not counted, and the transcripts of that very
pass are scored for WER/CER.

Definitions (units in the names):

* ``rtf``: per utterance, total compute time of all its chunks (features, encoder,
  search, the end-of-stream flush included) divided by the utterance's duration;
  reported as mean, p50 and p95 over utterances, with a bootstrap 95 % interval of
  the mean.
* ``chunk_latency_ms``: wall time of each chunk's compute; p50/p95/p99 over all chunks.
* ``ttft_s`` (time to first token): a stream starts at t = 0 when its first sample
  arrives, audio arrives in real time, and chunk ``k`` can start once the samples it
  needs have arrived (end-of-stream padding counts as arrived when the audio ends)
  and chunk ``k - 1`` has finished: ``start_k = max(ready_k, end_{k-1})``,
  ``end_k = start_k + compute_k``. TTFT is ``end_k`` of the first chunk after which
  the best hypothesis holds a non-blank token: the audio that must arrive plus the
  compute, queueing included. Utterances that never emit a token have no TTFT and are
  counted in ``ttft_missing``.
* ``peak_rss_mib``: the process's peak resident set size during the timed pass (sampled
  every 100 ms, so the sampling thread seldom competes with the timed one);
  ``rss_delta_mib``: its growth over the resident size before the pass.
* ``other_cpu_load``: cores other processes kept busy during the timed pass (the system's
  busy CPU time minus this process's own, over the pass's wall time); above
  :data:`LOAD_WARN_CORES` the pass comes with a ``load_warning``: on a 2-core machine one
  busy neighbour can make a chunk 30x slower, not 30 % (spinning OpenMP threads wait for
  a core that is not there).
* ``recompiles``: graphs ``torch.compile`` compiled during the timed pass (0: the compiled
  encoder reused its warm-up graphs; more means compile time inside the timings).
* ``threading``: the threads and wait policies the pass ran with (:func:`threading_settings`).
* ``wer``/``cer``: jiwer over the whole eval set; ``None`` ("not measured") when the
  weights are random. ``wer_ci95`` is a bootstrap 95 % interval over utterances
  (resampling whole utterances, errors and reference words together; ``None`` for a
  one-utterance set, as is ``rtf_mean_ci95``), and each
  transcript carries its word ``errors`` and reference ``words``, so that two
  configurations measured on the same set can be compared utterance by utterance
  (:func:`paired_wer_difference`): on a few hundred utterances a WER difference of a
  point or two is often within the noise of which sentences happen to be in the set.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import random
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

from dse.core.errors import DSEError

SPREAD_WARN_RATIO = 0.25
LOAD_WARN_CORES = 0.25  # other processes' CPU use during a timed pass, in cores, above which it is flagged
# libgomp's behaviour when OMP_WAIT_POLICY is unset (what torch's threads do then)
OMP_DEFAULT_POLICY = "unset (libgomp default: spin ~300,000 iterations, then sleep)"


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile, ``q`` in [0, 100]; ``None`` for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bootstrap_ci(values: Sequence, stat=statistics.fmean, n: int = 1000,
                 seed: int = 0) -> Optional[tuple[float, float]]:
    """95 % bootstrap interval of ``stat`` over ``values`` (resampling whole values, which may be
    tuples such as ``(errors, words)``); ``None`` for fewer than two values: one sample has no
    spread to resample, so it gets no interval rather than a zero-width one."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    samples = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return samples[int(0.025 * n)], samples[int(0.975 * n) - 1]


def ttft_s(compute_s: Sequence[float], ready_s: Sequence[float], emitted: Sequence[bool]) -> Optional[float]:
    """Time to first token on the real-time arrival model (see module docstring)."""
    end = 0.0
    for c, r, e in zip(compute_s, ready_s, emitted):
        end = max(r, end) + c
        if e:
            return end
    return None


def machine_fingerprint() -> dict:
    import torchaudio

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchaudio": torchaudio.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or OMP_DEFAULT_POLICY}


def threading_settings(recognizer=None) -> dict:
    """The threads and wait policies a timed pass runs with.

    ``torch_threads``: ``torch.get_num_threads()``; ``omp_wait_policy``: ``OMP_WAIT_POLICY`` as
    the process has it (libgomp reads it once, when torch loads; dse leaves it as the
    environment sets it); ``ort_threads`` and ``ort_spinning``: the intra-op
    threads and spinning of an ONNX Runtime encoder (``None`` for a torch encoder);
    ``ort_decoder_threads``: those of its predictor and joiner (``None`` for torch ones).
    """
    model = getattr(recognizer, "model", None)
    transcriber = getattr(model, "transcriber", None)
    predictor = getattr(model, "predictor", None)
    ort = hasattr(transcriber, "session")
    return {"torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or OMP_DEFAULT_POLICY,
            "ort_threads": transcriber.threads if ort else None,
            "ort_spinning": transcriber.spinning if ort else None,
            "ort_decoder_threads": predictor.threads if hasattr(predictor, "session") else None}


class OtherCpuLoad:
    """Cores that other processes kept busy while in a ``with`` block (psutil).

    ``other_cores`` = (the system's busy CPU seconds - this process's CPU seconds) / wall seconds;
    busy is user + nice + system + irq + softirq + steal (a hypervisor's stolen time is a
    neighbour too). The counters tick every 10 ms, so a block of under a second reads to a
    few hundredths of a core.
    """

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self.other_cores = 0.0
        self.wall_s = 0.0

    def _busy_s(self) -> float:
        t = self._psutil.cpu_times()
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own_s(self) -> float:
        t = self._process.cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)

    def __enter__(self) -> "OtherCpuLoad":
        self._busy0, self._own0, self._t0 = self._busy_s(), self._own_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t0
        other = (self._busy_s() - self._busy0) - (self._own_s() - self._own0)
        self.other_cores = max(0.0, other) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def warning(self) -> Optional[str]:
        if self.other_cores <= LOAD_WARN_CORES:
            return None
        return (f"the machine was busy: another process used {self.other_cores:.2f} cores during the timed pass; "
                "time again on a quiet machine")


class RssSampler:
    """The process's resident memory, sampled every ``interval_s`` on a thread while in a
    ``with`` block: ``peak_mib`` is the highest sample (the memory this pass needed, not the
    process's high-water mark since it started), ``delta_mib`` the growth over the RSS at entry."""

    def __init__(self, interval_s: float = 0.1):
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.start_mib = self.peak_mib = 0.0
        self._stop = None

    def _rss_mib(self) -> float:
        return self._process.memory_info().rss / 2**20

    def __enter__(self) -> "RssSampler":
        import threading

        self.start_mib = self.peak_mib = self._rss_mib()
        self._stop = threading.Event()

        def run():
            while not self._stop.wait(self.interval_s):
                self.peak_mib = max(self.peak_mib, self._rss_mib())
        self._thread = threading.Thread(target=run, daemon=True, name="dse-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._rss_mib())

    @property
    def delta_mib(self) -> float:
        return self.peak_mib - self.start_mib


@dataclasses.dataclass
class UtteranceTiming:
    id: str
    duration_s: float
    chunk_compute_s: list[float]
    ttft_s: Optional[float]
    text: str

    @property
    def rtf(self) -> float:
        return sum(self.chunk_compute_s) / self.duration_s


def stream_utterance(recognizer, waveform: torch.Tensor, utt_id: str = "") -> UtteranceTiming:
    """Stream ``waveform`` ``(samples,)`` through ``recognizer``, timing every chunk."""
    rate = recognizer.logmel.config.sample_rate
    n = waveform.numel()
    recognizer.reset()
    events = []
    for start, end in recognizer.arrival_pieces(n):
        events.extend(recognizer.accept_audio(waveform[start:end]))
    events.extend(recognizer.finish())
    compute = [e.compute_ns / 1e9 for e in events]
    ready = [min(e.samples_needed, n) / rate for e in events]
    emitted = [len(e.tokens) > 0 for e in events]
    return UtteranceTiming(utt_id, n / rate, compute, ttft_s(compute, ready, emitted), recognizer.text)


@dataclasses.dataclass
class EvalAudio:
    """Loaded eval utterances (audio read once, outside any timed region)."""
    ids: list[str]
    waveforms: list[torch.Tensor]
    texts: list[str]
    slices: list[str]
    skipped: list[str]


def load_eval_audio(source, limit: Optional[int] = None, progress: bool = False) -> EvalAudio:
    from dse.core.audio import read_audio
    from dse.core.datasets import iter_checked, load_eval_set

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DSEError(f"an utterance limit of {limit!r}: give a whole number of 1 or more")  # [:-3] drops the last 3
    utts = load_eval_set(source)[:limit]
    out = EvalAudio([], [], [], [], [])
    it = iter_checked(utts, read_audio)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(utts), desc="reading audio", unit="utt", leave=False)
    for utt, audio, problem in it:
        if problem:
            out.skipped.append(problem)
            continue
        out.ids.append(utt.id)
        out.waveforms.append(audio)
        out.texts.append(utt.text)
        out.slices.append(utt.slice)
    if not out.waveforms:
        raise DSEError(f"{source}: no usable utterances ({len(out.skipped)} skipped: {out.skipped[:3]})")
    return out


def score(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    import jiwer

    return {"wer": jiwer.wer(list(refs), list(hyps)), "cer": jiwer.cer(list(refs), list(hyps))}


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> list[tuple[int, int]]:
    """Per utterance, ``(word errors, reference words)`` as jiwer aligns it (their sums give the WER)."""
    import jiwer

    out = []
    for ref, hyp in zip(refs, hyps):
        o = jiwer.process_words(ref, hyp)
        out.append((o.substitutions + o.deletions + o.insertions, o.hits + o.substitutions + o.deletions))
    return out


def _pooled_wer(sample) -> float:
    words = sum(w for _, w in sample)
    return sum(e for e, _ in sample) / words if words else float("nan")


def wer_interval(errors: Sequence[tuple[int, int]], n: int = 1000, seed: int = 0) -> Optional[tuple[float, float]]:
    """Bootstrap 95 % interval of the pooled WER, resampling utterances; ``None`` for one utterance."""
    return bootstrap_ci(list(errors), stat=_pooled_wer, n=n, seed=seed)


def paired_wer_difference(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], n: int = 1000,
                          seed: int = 0) -> tuple[float, float, float]:
    """WER(a) - WER(b) on the same utterances, with its paired bootstrap 95 % interval.

    ``a`` and ``b`` are :func:`word_errors` of two configurations on one eval set, in the
    same order; an interval that holds 0 means the sets do not tell the two apart. Raises
    ``ValueError`` for fewer than two utterances (no interval to give).
    """
    if len(a) < 2:
        raise ValueError(f"paired_wer_difference needs at least two utterances, got {len(a)}")
    if len(a) != len(b) or any(wa != wb for (_, wa), (_, wb) in zip(a, b)):
        raise ValueError("paired_wer_difference needs the same utterances, in the same order, on both sides")
    triples = [(ea, eb, w) for (ea, w), (eb, _) in zip(a, b)]

    def diff(sample):
        words = sum(w for _, _, w in sample)
        return sum(ea - eb for ea, eb, _ in sample) / words if words else float("nan")

    lo, hi = bootstrap_ci(triples, stat=diff, n=n, seed=seed)
    return diff(triples), lo, hi


def dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process (0 before dynamo is loaded)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(recognizer, audio: EvalAudio, accuracy: bool = True, warmup: bool = True,
            progress: bool = False) -> dict:
    """Time ``recognizer`` on every utterance of ``audio``; score its transcripts when ``accuracy``."""
    if warmup:
        stream_utterance(recognizer, audio.waveforms[0])
    timings = []
    it = range(len(audio.waveforms))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="streaming", unit="utt", leave=False)
    graphs = dynamo_graphs()
    with RssSampler() as rss, OtherCpuLoad() as load:
        for i in it:
            timings.append(stream_utterance(recognizer, audio.waveforms[i], audio.ids[i]))
    recompiles = dynamo_graphs() - graphs
    rtfs = [t.rtf for t in timings]
    chunks_ms = [c * 1000 for t in timings for c in t.chunk_compute_s]
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    rtf_ci = bootstrap_ci(rtfs)  # None for one utterance
    rtf_mean = statistics.fmean(rtfs)
    result = {
        "utterances": len(timings), "audio_s": sum(t.duration_s for t in timings), "chunks": len(chunks_ms),
        "rtf_mean": rtf_mean, "rtf_mean_ci95": list(rtf_ci) if rtf_ci else None, "rtf_p50": percentile(rtfs, 50),
        "rtf_p95": percentile(rtfs, 95),
        "chunk_latency_p50_ms": percentile(chunks_ms, 50), "chunk_latency_p95_ms": percentile(chunks_ms, 95),
        "chunk_latency_p99_ms": percentile(chunks_ms, 99),
        "ttft_s": statistics.median(ttfts) if ttfts else None, "ttft_p95_s": percentile(ttfts, 95),
        "ttft_missing": len(timings) - len(ttfts),
        "peak_rss_mib": rss.peak_mib, "rss_delta_mib": rss.delta_mib, "skipped": audio.skipped,
        "wer": None, "cer": None, "wer_ci95": None, "wer_by_slice": {},
        "other_cpu_load": load.other_cores, "load_warning": load.warning, "recompiles": recompiles,
        "threading": threading_settings(recognizer),
    }
    result["spread_warning"] = (
        f"RTF 95% interval [{rtf_ci[0]:.4f}, {rtf_ci[1]:.4f}] is wider than {SPREAD_WARN_RATIO:.0%} of the mean "
        f"{rtf_mean:.4f}: the machine is noisy; measure again or use more utterances"
        if rtf_ci and rtf_mean > 0 and (rtf_ci[1] - rtf_ci[0]) / rtf_mean > SPREAD_WARN_RATIO else None)
    if accuracy:
        hyps = [t.text for t in timings]
        import jiwer

        # One word alignment per utterance gives the WER, its interval and the per-slice WERs.
        errors = word_errors(audio.texts, hyps)
        wer_ci = wer_interval(errors)  # None for one utterance
        result.update(wer=_pooled_wer(errors), cer=jiwer.cer(list(audio.texts), hyps),
                      wer_ci95=list(wer_ci) if wer_ci else None)
        by_slice: dict[str, list[int]] = {}
        for i, s in enumerate(audio.slices):
            by_slice.setdefault(s, []).append(i)
        if len(by_slice) > 1:
            result["wer_by_slice"] = {s: _pooled_wer([errors[i] for i in idx]) for s, idx in sorted(by_slice.items())}
        result["transcripts"] = [{"id": t.id, "ref": r, "hyp": t.text, "errors": e, "words": w}
                                 for t, r, (e, w) in zip(timings, audio.texts, errors)]
    return result


def interleaved_speedup(candidate, reference, audio: EvalAudio, rounds: int = 1,
                        limit: Optional[int] = None) -> dict:
    """Same-run ratio: time ``reference`` and ``candidate`` alternately (A B, then B A) per utterance.

    Returns the median over utterances of ``reference_time / candidate_time`` (> 1 means the
    candidate is faster), its bootstrap 95 % interval (``None`` for one utterance) and the sample count.
    """
    stream_utterance(candidate, audio.waveforms[0])
    stream_utterance(reference, audio.waveforms[0])
    ratios = []
    n = min(limit or len(audio.waveforms), len(audio.waveforms))
    for r in range(rounds):
        for i in range(n):
            w = audio.waveforms[i]
            order = (candidate, reference) if (i + r) % 2 == 0 else (reference, candidate)
            times = {}
            for rec in order:
                times[id(rec)] = sum(stream_utterance(rec, w).chunk_compute_s)
            ratios.append(times[id(reference)] / times[id(candidate)])
    ci = bootstrap_ci(ratios, stat=statistics.median)
    return {"speedup": statistics.median(ratios), "speedup_ci95": list(ci) if ci else None, "samples": len(ratios)}

"""Base architecture (emformer_rnnt_base, random weights), greedy: torch vs ONNX Runtime, fp32 vs int8, compile.

    python benchmarks/stream_base.py [--utterances 6] [--threads 2] [--chunks 60] [--model base]

Everything in one process, timed interleaved (the order rotates every round) on the same
inputs, so the ratios compare like with like on a noisy machine:

1. the encoder alone (per-chunk ``transcriber.infer``, state carried, after 5 warm-up chunks):
   torch fp32, torch int8 (``quantize_dynamic``), ONNX Runtime fp32 and int8 (its dynamic
   quantisation), each as :func:`dse.core.build.build_recognizer` builds it;
2. the whole stream (features + encoder + search, timed as :mod:`dse.core.measure` times it, one
   warm-up utterance each, with the milliseconds per chunk in the encoder, the search and the
   rest: features and bookkeeping): torch fp32 with torchaudio's search (the baseline before the
   vectorised search and the ONNX backend), torch int8 with torchaudio's search, torch int8
   with the vectorised search, ONNX Runtime fp32 and int8 with the numpy greedy loop the
   onnxruntime backend runs (:mod:`dse.core.ort_search`), and ONNX Runtime int8 with the vectorised
   search's torch loop over the same sessions; then ONNX Runtime int8 again with segments of
   ``--long-segment`` frames (default 32, 320 ms chunks: the chunk length of the streaming zipformer
   whose sherpa-onnx figures the goal quotes, "chunk-16" at its 50 Hz frame rate). A chunk then reads
   the encoder's weights once per 320 ms instead of per 160 ms, at 160 ms more algorithmic latency;
   the goals' verdict is for the default segment, and this row's RTF is printed beside it;
   then, at both segments, the torch-free runtime a bundle of that configuration deploys
   (:mod:`dse.deploy.lite`: numpy front end, the same ONNX Runtime sessions and numpy search,
   no torch tensors between them), timed as a deployment feeds it (every ``accept_audio`` call
   of the same arrival pieces, and ``finish``);
3. ``torch.compile`` (mode default) of the torch fp32 encoder: compile time, graphs compiled,
   recompiles while timed, compiled vs eager per chunk, and where a chunk's time goes
   (profile of both).

RTF: compute seconds per audio second over all timed utterances (a 160 ms chunk of the base
model is 16 frames). Ratios: medians over chunks or utterances with bootstrap 95 % intervals.
OpenMP's wait policy is what the environment sets, and ONNX Runtime's threads spin unless it is
PASSIVE (both printed). WER is not measured: the weights are random.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dse.core.build import build_recognizer
from dse.core.config import TrialConfig
from dse.core.measure import (OtherCpuLoad, bootstrap_ci, dynamo_graphs, load_eval_audio, machine_fingerprint,
                              stream_utterance, threading_settings)
from dse.core.models import DEFAULT_EVAL, random_model
from dse.core.stream import StreamingRecognizer

WARMUP_CHUNKS = 5
LONG = "ORT int8, long segment"
LONG_STREAM = LONG + " + numpy greedy"
LITE = "torch-free runtime, ORT int8"
LITE_LONG = LITE + ", long segment"


def interleaved_chunks(infers: dict, chunk_frames: int, n_chunks: int, n_mels: int = 80) -> dict[str, list[float]]:
    """Per-chunk seconds of each ``infer(x (1, chunk_frames, n_mels), lengths (1,), state)``, state
    carried, the order rotating every chunk; the first :data:`WARMUP_CHUNKS` are not kept."""
    names = list(infers)
    states = dict.fromkeys(names)
    times: dict[str, list[float]] = {n: [] for n in names}
    length = torch.tensor([chunk_frames])  # as a recognizer holds it, and its features made in inference mode
    with torch.inference_mode():           # as a stream makes them: a compiled graph guards on which
        gen = torch.Generator().manual_seed(0)
        xs = torch.randn(n_chunks + WARMUP_CHUNKS, 1, chunk_frames, n_mels, generator=gen)
        for i, x in enumerate(xs):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter_ns()
                _, _, states[name] = infers[name](x, length, states[name])
                if i >= WARMUP_CHUNKS:
                    times[name].append((time.perf_counter_ns() - t0) / 1e9)
    return times


def ratio_stats(reference: list[float], candidate: list[float]) -> tuple[float, float, float]:
    """``reference / candidate`` per sample: the median and its bootstrap 95 % interval."""
    r = [a / b for a, b in zip(reference, candidate)]
    lo, hi = bootstrap_ci(r, stat=statistics.median) or (float("nan"), float("nan"))
    return statistics.median(r), lo, hi


def ratio(reference: list[float], candidate: list[float]) -> str:
    """:func:`ratio_stats` as printed."""
    median, lo, hi = ratio_stats(reference, candidate)
    return f"{median:5.2f}x [{lo:.2f}, {hi:.2f}]"


def with_search(recognizer: StreamingRecognizer, search: str, temperature: float) -> StreamingRecognizer:
    """The same deployed model and front end with another search implementation (greedy)."""
    r = recognizer
    return StreamingRecognizer(r.model, r.logmel, r.tokenizer, r.segment_length, r.right_context_length,
                               beam_width=1, dtype=r.dtype, temperature=temperature, search=search,
                               threads=r.threads)  # its torch threads, whichever recognizer ran last


def torch_loop(recognizer: StreamingRecognizer, temperature: float) -> StreamingRecognizer:
    """The same ONNX Runtime recognizer with the vectorised search's torch greedy loop instead of
    the numpy one (:mod:`dse.core.ort_search`) over the same predictor and joiner sessions."""
    from dse.core.decoder import FastRNNTSearch

    r = with_search(recognizer, "vectorised", temperature)
    r.decoder = FastRNNTSearch.from_tokenizer(r.model, r.tokenizer, temperature=temperature, numpy_search=False)
    return r


def timed(fn, seconds: dict, key: str, calls: dict = None):
    """``fn``, adding the seconds of every call to ``seconds[key]`` (and counting it in ``calls[key]``)."""
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - t0
            if calls is not None:
                calls[key] += 1
    return call


def lite_recognizer(built, threads: int):
    """The torch-free runtime (:class:`dse.deploy.lite.LiteRecognizer`) over the files ``built``
    (an ONNX Runtime configuration) runs: its encoder, predictor and joiner from the export cache,
    its front end's statistics and vocabulary, as a bundle of that trial would hold them."""
    import os
    from pathlib import Path

    from dse.deploy.export import features_record
    from dse.deploy.lite import LiteRecognizer

    info = built.export_info
    encoder, decoder = Path(info["path"]), {k: Path(v) for k, v in info["decoder"]["paths"].items()}
    directory = Path(os.path.commonpath([encoder, *decoder.values()]))
    config = {"encoder_artifact": {"file": str(encoder.relative_to(directory)),
                                   "decoder": {k: {"file": str(v.relative_to(directory))} for k, v in decoder.items()}}}
    return LiteRecognizer(directory, config, features_record(built.loaded), built.loaded.tokenizer.to_dict(),
                          built.config, threads=threads)


class LiteStream:
    """Streams an utterance through a torch-free recognizer as :func:`stream_utterance` streams one
    through the torch runtime (the same arrival pieces), timing every ``accept_audio`` call and
    ``finish``, with the seconds in the encoder's and the search's calls (``seconds``) and the
    chunks decoded (``chunks``)."""

    def __init__(self, lite, pieces_of):
        self.lite, self.pieces_of = lite, pieces_of
        self.seconds = {"encoder": 0.0, "search": 0.0}
        self.calls = dict.fromkeys(self.seconds, 0)
        # all the recognizer calls of its encoder session and its search, wrapped in place
        lite.encoder.run = timed(lite.encoder.run, self.seconds, "encoder", self.calls)
        lite.search.advance = timed(lite.search.advance, self.seconds, "search", self.calls)

    @property
    def chunks(self) -> int:
        return self.calls["encoder"]

    def clear(self) -> None:
        for key in self.seconds:
            self.seconds[key], self.calls[key] = 0.0, 0

    def __call__(self, waveform: torch.Tensor) -> tuple[float, str]:
        """Compute seconds for ``waveform`` and the text."""
        samples = waveform.numpy()
        lite, total = self.lite, 0.0
        lite.reset()
        for start, end in self.pieces_of(samples.shape[0]):
            t0 = time.perf_counter_ns()
            lite.accept_audio(samples[start:end])
            total += time.perf_counter_ns() - t0
        t0 = time.perf_counter_ns()
        lite.finish()
        total += time.perf_counter_ns() - t0
        return total / 1e9, lite.text


class Breakdown:
    """Seconds a recognizer's decoder spends in ``infer`` (encoder + search) and in ``_search``,
    accumulated while attached: the encoder is the difference, the rest of a chunk the front end
    (features) and bookkeeping. Wraps the decoder object only (recognizers here share models);
    works for torchaudio's ``RNNTBeamSearch`` and the vectorised search alike."""

    def __init__(self, recognizer: StreamingRecognizer):
        self._seconds = {"infer": 0.0, "search": 0.0}
        self.decoder = recognizer.decoder
        for name in ("infer", "_search"):
            setattr(self.decoder, name, timed(getattr(self.decoder, name), self._seconds, name.strip("_")))

    @property
    def seconds(self) -> dict:
        return {"encoder": self._seconds["infer"] - self._seconds["search"], "search": self._seconds["search"]}

    def detach(self) -> None:
        for name in ("infer", "_search"):
            self.decoder.__dict__.pop(name, None)


def profile_chunks(infer, chunk_frames: int, n_mels: int, n: int = 8, top: int = 6) -> tuple[list[tuple[str, float]], float]:
    """Top operators by self CPU time per chunk over ``n`` steady-state chunks, and the share of GEMMs."""
    from torch.profiler import ProfilerActivity, profile

    length, state = torch.tensor([chunk_frames]), None
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(1)
        xs = torch.randn(12 + n, 1, chunk_frames, n_mels, generator=gen)
        for x in xs[:12]:  # past the left context: the steady state
            _, _, state = infer(x, length, state)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in xs[12:]:
                _, _, state = infer(x, length, state)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    gemm = sum(e.self_cpu_time_total for e in events
               if any(k in e.key for k in ("addmm", "aten::mm", "bmm", "linear", "mkldnn", "gemm", "extern_kernels")))
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key[:48], e.self_cpu_time_total / 1000 / n) for e in rows], gemm / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=6, help="eval utterances streamed (default 6)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunks", type=int, default=60, help="timed encoder chunks per configuration (default 60)")
    p.add_argument("--model", default="base", help="architecture (default base; tiny for a quick check of the script)")
    p.add_argument("--long-segment", type=int, default=32,
                   help="also stream ORT int8 with segments of this many frames (default 32: 320 ms chunks, the "
                        "chunk length of the streaming zipformer sherpa-onnx's figures are for; 0: skip)")
    args = p.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    audio = load_eval_audio(DEFAULT_EVAL, args.utterances)
    audio_s = sum(w.numel() for w in audio.waveforms) / 16000
    loaded = random_model(args.model)
    m = machine_fingerprint()
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} cores, {args.threads} threads, torch {m['torch']}, "
          f"OMP_WAIT_POLICY {m['omp_wait_policy']}")
    print(f"audio: {len(audio.waveforms)} utterances, {audio_s:.1f} s; greedy; WER not measured (random weights)")

    configs = {"torch fp32": {}, "torch int8": {"precision": "int8"}, "ORT fp32": {"backend": "onnxruntime"},
               "ORT int8": {"backend": "onnxruntime", "precision": "int8"}}
    if args.long_segment:  # the same configuration with chunks twice as long: a geometry knob, not a runtime
        configs[LONG] = {"backend": "onnxruntime", "precision": "int8", "segment_frames": args.long_segment}
    built = {}
    for name, knobs in configs.items():
        built[name] = build_recognizer(loaded, TrialConfig(beam_width=1, threads=args.threads, **knobs))
        b = built[name]
        if b.export_s is not None:
            info = b.export_info
            print(f"  {name}: export {b.export_s:.1f} s" + (" (export cache hit)" if info.get("hit") else "")
                  + f", {info['bytes'] / 2**20:.0f} MiB, {info.get('graph', '?')} graph of {info.get('nodes', '?')} nodes")
    torch.set_num_threads(args.threads)
    t = threading_settings(built["ORT int8"].recognizer)
    print(f"threads: torch {t['torch_threads']}, ONNX Runtime {t['ort_threads']} (spinning "
          f"{'on' if t['ort_spinning'] else 'off'})")
    chunk_frames = built["torch fp32"].recognizer.chunk_frames
    chunk_audio_s = built["torch fp32"].recognizer.advance_frames * 0.01

    # 1. the encoder alone (at the default segment: the long-segment row's chunks have another shape)
    with OtherCpuLoad() as load:
        enc = interleaved_chunks({n: b.recognizer.model.transcriber.infer for n, b in built.items() if n != LONG},
                                 chunk_frames, args.chunks)
    print(f"\n1. encoder alone, {args.chunks} chunks of {chunk_frames} frames ({chunk_audio_s * 1000:.0f} ms of audio), "
          f"interleaved; other processes' load {load.other_cores:.2f} cores")
    print(f"   {'config':<12} {'ms/chunk p50':>12} {'enc RTF':>8}   {'speedup vs torch fp32':>24}   "
          f"{'vs torch int8':>22}")
    for name, ts in enc.items():
        med = statistics.median(ts)
        print(f"   {name:<12} {med * 1000:12.2f} {med / chunk_audio_s:8.3f}   {ratio(enc['torch fp32'], ts):>24}   "
              f"{ratio(enc['torch int8'], ts):>22}")

    # 2. the whole stream
    temperature = built["torch fp32"].config.temperature
    streams = {
        "torch fp32 + torchaudio search": with_search(built["torch fp32"].recognizer, "torchaudio", temperature),
        "torch int8 + torchaudio search": with_search(built["torch int8"].recognizer, "torchaudio", temperature),
        "torch int8 + vectorised": built["torch int8"].recognizer,
        "ORT fp32 + numpy greedy": built["ORT fp32"].recognizer,
        "ORT int8 + torch greedy loop": torch_loop(built["ORT int8"].recognizer, temperature),
        "ORT int8 + numpy greedy": built["ORT int8"].recognizer,
    }
    if LONG in built:
        streams[LONG_STREAM] = built[LONG].recognizer
    lites = {LITE: LiteStream(lite_recognizer(built["ORT int8"], args.threads), built["ORT int8"].recognizer.arrival_pieces)}
    if LONG in built:
        lites[LITE_LONG] = LiteStream(lite_recognizer(built[LONG], args.threads), built[LONG].recognizer.arrival_pieces)
    names = list(streams) + list(lites)
    for rec in streams.values():
        stream_utterance(rec, audio.waveforms[0])  # warm-up, not counted
    for lite in lites.values():
        lite(audio.waveforms[0])
    per_utt: dict[str, list[float]] = {n: [] for n in names}
    texts: dict[str, list[str]] = {n: [] for n in names}
    parts = {n: Breakdown(streams[n]) for n in streams}
    for lite in lites.values():
        lite.clear()
    chunks = dict.fromkeys(names, 0)
    with OtherCpuLoad() as load:
        for i, w in enumerate(audio.waveforms):
            for name in names[i % len(names):] + names[:i % len(names)]:
                if name in lites:
                    seconds, text = lites[name](w)
                    per_utt[name].append(seconds)
                    texts[name].append(text)
                    continue
                run = stream_utterance(streams[name], w)
                per_utt[name].append(sum(run.chunk_compute_s))
                texts[name].append(run.text)
                chunks[name] += len(run.chunk_compute_s)
    for b in parts.values():
        b.detach()
    for name, lite in lites.items():
        chunks[name] = lite.chunks
    base, int8_ta = per_utt[names[0]], per_utt[names[1]]
    print(f"\n2. whole stream (features + encoder + search), {len(audio.waveforms)} utterances, interleaved; "
          f"other processes' load {load.other_cores:.2f} cores" + (" (BUSY: absolute times are inflated)"
                                                                  if load.warning else ""))
    print(f"   {'config':<32} {'RTF':>6}   {'speedup vs baseline':>22}   {'vs torch int8 + torchaudio':>26}   "
          f"ms/chunk: {'encoder':>7} {'search':>6} {'rest':>5}")
    for name in names:
        rtf = sum(per_utt[name]) / audio_s
        seconds = lites[name].seconds if name in lites else parts[name].seconds
        enc_ms, search_ms = (seconds[k] * 1000 / chunks[name] for k in ("encoder", "search"))
        rest_ms = sum(per_utt[name]) * 1000 / chunks[name] - enc_ms - search_ms
        print(f"   {name:<32} {rtf:6.3f}   {ratio(base, per_utt[name]):>22}   {ratio(int8_ta, per_utt[name]):>26}   "
              f"          {enc_ms:7.2f} {search_ms:6.2f} {rest_ms:5.2f}")
    print(f"   numpy greedy loop against the torch loop, same ONNX Runtime int8 sessions: "
          f"{ratio(per_utt['ORT int8 + torch greedy loop'], per_utt['ORT int8 + numpy greedy'])}")
    for name, same_as in ((LITE, "ORT int8 + numpy greedy"), (LITE_LONG, LONG_STREAM)):
        if name in lites:
            same = sum(a == b for a, b in zip(texts[name], texts[same_as]))
            print(f"   {name} against the torch runtime on the same files: {ratio(per_utt[same_as], per_utt[name])}; "
                  f"the same transcript {same}/{len(texts[name])}")
    best = min((n for n in names if n not in (LONG_STREAM, LITE_LONG)), key=lambda n: sum(per_utt[n]))
    best_rtf = sum(per_utt[best]) / audio_s
    best_x, low, _ = ratio_stats(int8_ta, per_utt[best])
    verdict = "met" if low >= 2 else "median met, 95% interval below" if best_x >= 2 else "NOT met"
    if args.model == "base":
        print(f"   best: {best}, RTF {best_rtf:.3f} (goal <= 0.05: {'met' if best_rtf <= 0.05 else 'NOT met'}), "
              f"{best_x:.2f}x torch int8 + torchaudio greedy, 95% from {low:.2f} (goal >= 2x: {verdict})")
    else:
        print(f"   best: {best}, RTF {best_rtf:.3f}, {best_x:.2f}x torch int8 + torchaudio greedy (the goals are the base's)")
    if LONG in built:
        name = min((LONG_STREAM, LITE_LONG), key=lambda n: sum(per_utt[n]))
        rtf = sum(per_utt[name]) / audio_s
        seg_ms = args.long_segment * 10
        print(f"   at {seg_ms} ms segments ({name}; algorithmic latency {seg_ms} + "
              f"{built[LONG].config.right_context_frames * 10} ms right context against "
              f"{built['ORT int8'].config.segment_frames * 10} + {built['ORT int8'].config.right_context_frames * 10}): "
              f"RTF {rtf:.3f}" + (f" (goal <= 0.05: {'met' if rtf <= 0.05 else 'NOT met'})" if args.model == "base" else ""))

    # 3. torch.compile of the fp32 encoder
    compiled = build_recognizer(loaded, TrialConfig(beam_width=1, threads=args.threads, compile="default"))
    torch.set_num_threads(args.threads)
    graphs = dynamo_graphs()
    comp = interleaved_chunks({"eager": built["torch fp32"].recognizer.model.transcriber.infer,
                               "compiled": compiled.recognizer.model.transcriber.infer}, chunk_frames, args.chunks)
    recompiles = dynamo_graphs() - graphs
    e_ms, c_ms = statistics.median(comp["eager"]) * 1000, statistics.median(comp["compiled"]) * 1000
    print(f"\n3. torch.compile (default) of the torch fp32 encoder: compile {compiled.compile_s:.1f} s, "
          f"{compiled.compile_graphs} graphs; {recompiles} recompiles over {args.chunks} timed chunks")
    print(f"   eager {e_ms:.2f} ms/chunk, compiled {c_ms:.2f} ms/chunk: speedup {ratio(comp['eager'], comp['compiled'])}")
    for label, infer in (("eager", built["torch fp32"].recognizer.model.transcriber.infer),
                         ("compiled", compiled.recognizer.model.transcriber.infer)):
        rows, gemm = profile_chunks(infer, chunk_frames, loaded.arch["input_dim"])
        print(f"   profile, {label}: GEMMs {gemm:.0%} of operator self time; top operators (ms/chunk): "
              + "; ".join(f"{k} {v:.2f}" for k, v in rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

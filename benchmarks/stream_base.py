"""Base architecture (emformer_rnnt_base, random weights), fp32: streaming speed, and int8 vs fp32.

    python benchmarks/stream_base.py [--utterances 6] [--threads 2]

Prints RTF, chunk p95 and TTFT for greedy and beam-10 decoding, then the same-run
ratio of int8 dynamic quantisation against fp32, timed interleaved (A B, B A, ...)
on the same utterances: first the encoder alone (per-chunk ``transcriber.infer``),
then the whole streaming path. WER is not measured: the weights are random.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dse.core.config import TrialConfig
from dse.core.measure import bootstrap_ci, interleaved_speedup, load_eval_audio, machine_fingerprint, measure
from dse.core.models import DEFAULT_EVAL, random_model
from dse.core.build import apply_precision, build_recognizer


def encoder_ratio(fp32_model, int8_model, chunk_frames: int, n_chunks: int = 60) -> dict:
    """Interleaved per-chunk encoder time, fp32 / int8, over ``n_chunks`` streamed chunks."""
    x = torch.randn(1, chunk_frames, 80)
    length = torch.tensor([chunk_frames])
    states = {id(fp32_model): None, id(int8_model): None}
    times = {id(fp32_model): [], id(int8_model): []}
    with torch.inference_mode():
        for i in range(n_chunks + 5):
            order = (fp32_model, int8_model) if i % 2 == 0 else (int8_model, fp32_model)
            for m in order:
                t0 = time.perf_counter_ns()
                _, _, states[id(m)] = m.transcriber.infer(x, length, states[id(m)])
                if i >= 5:  # warm-up chunks are not counted
                    times[id(m)].append(time.perf_counter_ns() - t0)
    a, b = times[id(fp32_model)], times[id(int8_model)]
    ratios = [x / y for x, y in zip(a, b)]
    return {"fp32_ms": statistics.median(a) / 1e6, "int8_ms": statistics.median(b) / 1e6,
            "speedup": statistics.median(ratios), "ci95": bootstrap_ci(ratios, stat=statistics.median)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=6, help="eval utterances to stream (default 6)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    audio = load_eval_audio(DEFAULT_EVAL, args.utterances)
    loaded = random_model("base")
    m = machine_fingerprint()
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} cores, {args.threads} threads, torch {m['torch']}")
    print(f"audio: {len(audio.waveforms)} utterances, {sum(w.numel() for w in audio.waveforms) / 16000:.1f} s; "
          "WER: not measured (random weights)")
    print(f"{'config':<16} {'RTF mean':>9} {'RTF p95':>8} {'chunk p95 ms':>13} {'TTFT s':>7}")
    for beam in (1, 10):
        built = build_recognizer(loaded, TrialConfig(beam_width=beam, threads=args.threads))
        r = measure(built.recognizer, audio, accuracy=False)
        ttft = "none" if r["ttft_s"] is None else f"{r['ttft_s']:.3f}"
        print(f"{'fp32 beam ' + str(beam):<16} {r['rtf_mean']:>9.3f} {r['rtf_p95']:>8.3f} "
              f"{r['chunk_latency_p95_ms']:>13.1f} {ttft:>7}")
    fp32 = apply_precision(loaded.model, "fp32")
    int8 = apply_precision(loaded.model, "int8")
    e = encoder_ratio(fp32, int8, 20)
    print(f"encoder chunk, same run: fp32 {e['fp32_ms']:.1f} ms, int8 {e['int8_ms']:.1f} ms, "
          f"int8 speedup {e['speedup']:.2f}x [95% CI {e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}]")
    base = build_recognizer(loaded, TrialConfig(beam_width=1, threads=args.threads)).recognizer
    q = build_recognizer(loaded, TrialConfig(beam_width=1, precision="int8", threads=args.threads)).recognizer
    s = interleaved_speedup(q, base, audio)
    print(f"whole stream (greedy), same run: int8 speedup over fp32 {s['speedup']:.2f}x "
          f"[95% CI {s['speedup_ci95'][0]:.2f}, {s['speedup_ci95'][1]:.2f}], {s['samples']} utterances")


if __name__ == "__main__":
    main()

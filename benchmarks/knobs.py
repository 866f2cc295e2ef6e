"""A first map of the design space on the embedded default: each knob alone against the baseline.

    python benchmarks/knobs.py [--utterances 40] [--ratio-utterances 12] [--knobs KNOB ...] [--profile]

Baseline: fp32, beam 10, the trained geometry, 2 threads. For each knob setting,
one row: same-run speedup over the baseline (interleaved A B / B A per utterance,
median ratio of stream compute time, with its 95 % interval), chunk p95, TTFT, WER
delta against the baseline (both measured on the same utterances, from the same
streaming pass that is timed), and weight MiB. With ``--profile``, the top
operators by self CPU time for the baseline, int8 and an MoE model.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from dse.core.config import TrialConfig
from dse.core.measure import interleaved_speedup, load_eval_audio, machine_fingerprint, measure
from dse.core.models import DEFAULT_EVAL, load_model
from dse.search.study import operator_profile
from dse.core.build import build_recognizer

BASELINE = TrialConfig(beam_width=10, threads=2)
SETTINGS = [
    ("precision", "bf16"), ("precision", "fp16"), ("precision", "int8"), ("precision", "amp-bf16"),
    ("beam_width", 1), ("beam_width", 4),
    ("lm_weight", 0.3),
    ("right_context_frames", 0), ("right_context_frames", 8),
    ("segment_frames", 8), ("segment_frames", 32),
    ("moe_experts", 4), ("moe_experts", 8),
    ("hop_samples", 240),
    ("compile", "default"),
    ("threads", 1),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=40, help="eval utterances for WER and timing (default 40)")
    p.add_argument("--ratio-utterances", type=int, default=12, help="utterances for the interleaved ratio")
    p.add_argument("--knobs", nargs="+", help="only the settings of these knobs (default: all)")
    p.add_argument("--profile", action="store_true", help="operator breakdown for baseline, int8 and MoE")
    args = p.parse_args()
    loaded = load_model()
    audio = load_eval_audio(DEFAULT_EVAL, args.utterances)
    m = machine_fingerprint()
    print(f"model {loaded.name} ({loaded.weights}), {loaded.num_params():,} parameters; "
          f"{len(audio.waveforms)} utterances, {sum(w.numel() for w in audio.waveforms) / 16000:.0f} s")
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']}")
    torch.set_num_threads(BASELINE.threads)
    base = build_recognizer(loaded, BASELINE)
    base_r = measure(base.recognizer, audio, accuracy=loaded.trained)
    print(f"baseline {BASELINE.precision} beam {BASELINE.beam_width}: RTF {base_r['rtf_mean']:.4f}, "
          f"chunk p95 {base_r['chunk_latency_p95_ms']:.2f} ms, TTFT {base_r['ttft_s']}, WER {base_r['wer']}, "
          f"{base.weight_mib:.2f} MiB")
    header = f"{'knob':<22} {'value':>9} {'speedup':>8} {'95% CI':>13} {'chunk p95 ms':>13} {'TTFT s':>7} {'WER':>6} {'dWER':>7} {'MiB':>6}"
    print(header)
    print("-" * len(header))
    unknown = set(args.knobs or ()) - {k for k, _ in SETTINGS}
    if unknown:
        p.error(f"no setting of {', '.join(sorted(unknown))}; knobs here: {', '.join(dict(SETTINGS))}")
    for knob, value in SETTINGS:
        if args.knobs and knob not in args.knobs:
            continue
        cfg = dataclasses.replace(BASELINE, **{knob: value})
        if knob == "moe_experts":
            cfg = cfg.replace(moe_top_k=2, moe_hidden=loaded.arch["transformer_ffn_dim"] // 2)
        try:
            built = build_recognizer(loaded, cfg)
        except Exception as exc:  # a knob that cannot be built is a finding, not a crash
            print(f"{knob:<22} {str(value):>9} failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        torch.set_num_threads(cfg.threads)
        r = measure(built.recognizer, audio, accuracy=loaded.trained)
        s = interleaved_speedup(built.recognizer, base.recognizer, audio, limit=args.ratio_utterances)
        torch.set_num_threads(BASELINE.threads)
        wer = "n/m" if r["wer"] is None else f"{r['wer']:.3f}"
        dwer = "n/m" if r["wer"] is None else f"{r['wer'] - base_r['wer']:+.3f}"
        ttft = "none" if r["ttft_s"] is None else f"{r['ttft_s']:.3f}"
        note = " (no adaptation)" if knob in ("moe_experts", "hop_samples") else ""
        print(f"{knob:<22} {str(value):>9} {s['speedup']:>7.2f}x [{s['speedup_ci95'][0]:.2f}, {s['speedup_ci95'][1]:.2f}]"
              f" {r['chunk_latency_p95_ms']:>13.2f} {ttft:>7} {wer:>6} {dwer:>7} {built.weight_mib:>6.2f}{note}")
    if args.profile:
        for name, cfg in (("baseline", BASELINE), ("int8", dataclasses.replace(BASELINE, precision="int8")),
                          ("moe E=8 k=2", dataclasses.replace(BASELINE, moe_experts=8, moe_top_k=2,
                                                              moe_hidden=loaded.arch["transformer_ffn_dim"] // 2))):
            rows = operator_profile(build_recognizer(loaded, cfg).recognizer, audio.waveforms[0], top=8)
            print(f"\ntop operators by self CPU time, {name}:")
            for row in rows:
                print(f"  {row['op']:<40} {row['self_cpu_ms']:>9.1f} ms {row['share']:>6.1%} {row['calls']:>7} calls")


if __name__ == "__main__":
    main()

"""The shipped default model's accuracy and speed, per eval slice, for its model card.

    python benchmarks/default_model.py [--limit N] [--model CHECKPOINT] [--rows SUBSTRING ...]

Streams the whole eval split through the default model at its default configuration
(fp32, trained right context, beam 4, decoder temperature 2, the shipped character
language model fused at weight 0.15, 2 threads), without the language model (the
acoustic model alone), at temperature 1 (the search on the joint network's own
distribution), and at the settings that show whether accuracy responds to the design
space as a real model's does: right context 0, bf16, int8, greedy decoding (with and
without the LM) and beam 8.
Each row is one streaming pass: WER/CER come from the transcripts of the very pass that
is timed. Prints a Markdown table; the WER column carries a bootstrap 95 % interval over
utterances, and each row after the first its WER difference from the first row, paired
utterance by utterance, with its 95 % interval (an interval that holds 0: the eval split
cannot tell the two apart).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from dse.core.config import DEFAULT_LM_WEIGHT, TrialConfig
from dse.core.measure import load_eval_audio, machine_fingerprint, measure, paired_wer_difference
from dse.core.models import DEFAULT_CHECKPOINT, DEFAULT_EVAL, lm_beside, load_model, with_lm
from dse.core.build import build_recognizer

DEFAULT_LM = lm_beside(DEFAULT_CHECKPOINT)

DEFAULT = TrialConfig(lm_weight=DEFAULT_LM_WEIGHT)  # what the CLI and studies use for a model with an LM
ROWS = [
    (f"default (fp32, rc 4, beam 4, LM {DEFAULT_LM_WEIGHT:g})", DEFAULT),
    ("no LM (the acoustic model alone)", replace(DEFAULT, lm_weight=0.0)),
    ("temperature 1 (the model's own distribution)", replace(DEFAULT, temperature=1.0)),
    ("right context 0", replace(DEFAULT, right_context_frames=0)),
    ("bf16", replace(DEFAULT, precision="bf16")),
    ("int8", replace(DEFAULT, precision="int8")),
    ("greedy (beam 1; greedy decodes without the LM by default)", replace(DEFAULT, beam_width=1, lm_weight=0.0)),
    ("greedy with the LM", replace(DEFAULT, beam_width=1)),
    ("beam 8", replace(DEFAULT, beam_width=8)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, help="first N eval utterances only")
    p.add_argument("--model", help="a candidate checkpoint instead of the shipped default (its LM: the .lm.gz "
                                   "beside it, else the default's)")
    p.add_argument("--rows", nargs="+", help="only the rows whose name contains one of these strings")
    args = p.parse_args()
    loaded = load_model(args.model)
    if loaded.lm_path is None and DEFAULT_LM.exists():
        loaded = with_lm(loaded, str(DEFAULT_LM))
    rows = [(n, c) for n, c in ROWS if not args.rows or any(r in n for r in args.rows)]
    audio = load_eval_audio(DEFAULT_EVAL, args.limit)
    m = machine_fingerprint()
    slices = sorted(set(audio.slices))
    print(f"model {loaded.weights}, {loaded.num_params():,} parameters; eval: {len(audio.waveforms)} utterances, "
          f"{sum(w.numel() for w in audio.waveforms) / 16000 / 60:.1f} min; {m['cpu_model']}, 2 threads, torch {m['torch']}\n")
    print("| configuration | WER [95 % CI] | WER - first row [95 % CI] | CER | " + " | ".join(f"WER {s}" for s in slices)
          + " | RTF mean | chunk p95 ms | TTFT s | eval wall s |")
    print("|---" * (8 + len(slices)) + "|")  # 4 columns before the slices, 4 after
    first = None
    for name, cfg in rows:
        torch.set_num_threads(cfg.threads)
        built = build_recognizer(loaded, cfg)
        t0 = time.perf_counter()
        r = measure(built.recognizer, audio, accuracy=True)
        wall = time.perf_counter() - t0
        per = " | ".join(f"{r['wer_by_slice'].get(s, r['wer']):.3f}" for s in slices)
        errors = [(t["errors"], t["words"]) for t in r["transcripts"]]
        if first is None:
            first, delta = errors, "-"
        else:
            d, lo, hi = paired_wer_difference(errors, first)
            delta = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        lo, hi = r["wer_ci95"]
        print(f"| {name} | {r['wer']:.3f} [{lo:.3f}, {hi:.3f}] | {delta} | {r['cer']:.3f} | {per} | {r['rtf_mean']:.4f} | "
              f"{r['chunk_latency_p95_ms']:.2f} | {r['ttft_s']:.3f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()

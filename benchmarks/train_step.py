"""One training step of the embedded default's architecture, fp32 against bf16 autocast.

    python benchmarks/train_step.py [--preset small] [--batch 15] [--frames 400] [--chars 60] [--reps 6]

Builds the preset's model on a synthetic batch of the shape the trainer sees (``--batch``
utterances of ``--frames`` feature frames and ``--chars`` target characters; the default is
about one 6,000-frame batch), then times forward, RNN-T + CTC loss and backward in each mode,
interleaved round-robin so machine noise hits both alike. Prints median seconds per step and
the bf16/fp32 speed ratio with a bootstrap interval. The loss is always computed in fp32 (the
logits are cast back before ``rnnt_loss``).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from dse import train
from dse.measure import bootstrap_ci
from dse.models import CharTokenizer, architecture, build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(train.PRESETS))
    p.add_argument("--batch", type=int, default=15)
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--chars", type=int, default=60)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = CharTokenizer()
    arch = architecture(train.PRESETS[args.preset].arch)
    model = build(arch, tok.num_symbols).train()
    head = torch.nn.Linear(arch["encoding_dim"], tok.num_symbols)
    feats = [torch.randn(args.frames, 80) for _ in range(args.batch)]
    targets = [[int(t) for t in torch.randint(1, tok.num_symbols, (args.chars,))] for _ in range(args.batch)]
    batch = train.collate(feats, targets, arch["time_reduction_stride"], arch["right_context_length"],
                          torch.zeros(80))
    modes = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    times = {m: [] for m in modes}
    for rep in range(args.reps + 1):
        for name, ctx in modes.items():
            t0 = time.perf_counter()
            with ctx():
                loss, _ = train.rnnt_step_loss(model, head, batch, tok.blank, 0.3)
            model.zero_grad(set_to_none=True)
            loss.backward()
            if rep:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts):.3f} s/step (n={len(ts)})")
    ratios = [a / b for a, b in zip(times["fp32"], times["bf16"])]
    lo, hi = bootstrap_ci(ratios)
    print(f"bf16 speedup over fp32: {statistics.median(ratios):.2f}x [{lo:.2f}, {hi:.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

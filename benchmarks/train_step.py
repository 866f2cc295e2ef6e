"""One training step of the embedded default's architecture, fp32 against bf16 autocast.

    python benchmarks/train_step.py [--preset small] [--batch 15] [--frames 400] [--chars 60] [--reps 6]
                                    [--device cpu|cuda]

Builds the preset's model on a synthetic batch of the shape the trainer sees (``--batch``
utterances of ``--frames`` feature frames and ``--chars`` target characters; the default is
about one 6,000-frame batch), then times forward, RNN-T + CTC loss and backward in each mode,
interleaved round-robin so machine noise hits both alike. Prints median seconds per step and
the bf16/fp32 speed ratio with a bootstrap interval. The loss is always computed in fp32 (the
logits are cast back before ``rnnt_loss``). On ``--device cuda`` each timing waits for the
GPU to finish (``torch.cuda.synchronize``) and the optimiser step is included, so the figure
is what one step of ``python -m dse.train --device cuda`` costs; it also prints the audio
hours trained per hour of wall time at that batch (10 ms feature frames).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from dse.training import train
from dse.core.measure import bootstrap_ci
from dse.core.models import CharTokenizer, architecture, build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(train.PRESETS))
    p.add_argument("--batch", type=int, default=15)
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--chars", type=int, default=60)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    tok = CharTokenizer()
    arch = architecture(train.PRESETS[args.preset].arch)
    model = build(arch, tok.num_symbols).train().to(device)
    head = torch.nn.Linear(arch["encoding_dim"], tok.num_symbols).to(device)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-4)
    feats = [torch.randn(args.frames, 80) for _ in range(args.batch)]
    targets = [[int(t) for t in torch.randint(1, tok.num_symbols, (args.chars,))] for _ in range(args.batch)]
    batch = train.collate(feats, targets, arch["time_reduction_stride"], arch["right_context_length"],
                          torch.zeros(80))
    batch = tuple(t.to(device) for t in batch)
    modes = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast(device.type, dtype=torch.bfloat16)}
    times = {m: [] for m in modes}
    for rep in range(args.reps + 1):
        for name, ctx in modes.items():
            sync()
            t0 = time.perf_counter()
            with ctx():
                loss, _ = train.rnnt_step_loss(model, head, batch, tok.blank, 0.3)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if device.type == "cuda":
                opt.step()
            sync()
            if rep:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    audio_h = args.batch * args.frames * 0.01 / 3600
    for name, ts in times.items():
        step_s = statistics.median(ts)
        print(f"{name}: {step_s:.3f} s/step (n={len(ts)}), {audio_h * 3600 / step_s:.0f} audio hours per hour "
              f"on {args.device}")
    ratios = [a / b for a, b in zip(times["fp32"], times["bf16"])]
    lo, hi = bootstrap_ci(ratios)
    print(f"bf16 speedup over fp32: {statistics.median(ratios):.2f}x [{lo:.2f}, {hi:.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

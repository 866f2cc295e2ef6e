"""int8 back ends side by side: torch.ao ``quantize_dynamic`` against torchao, on the encoder.

    python benchmarks/int8_backends.py [--model base] [--chunks 60]

Times one streamed encoder chunk (``transcriber.infer``) of fp32, ``quantize_dynamic``
(Linear layers, qint8 weights, dynamic activations) and torchao's
``Int8DynamicActivationInt8WeightConfig`` (the maintained successor), interleaved
round-robin so machine noise hits all three alike, and prints median chunk times and
ratios against fp32. torchao is optional: without it, its row says so.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from dse.core.measure import bootstrap_ci
from dse.core.models import load_model, random_model


def torchao_int8(model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(model).eval()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def ao_int8(model):
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="'base' (random weights) or 'default' (the shipped model)")
    p.add_argument("--chunks", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = random_model("base") if args.model == "base" else load_model()
    fp32 = copy.deepcopy(loaded.model).eval()
    variants = {"fp32": fp32, "quantize_dynamic": ao_int8(fp32)}
    try:
        variants["torchao int8"] = torchao_int8(fp32)
    except Exception as exc:
        print(f"torchao int8: unavailable ({type(exc).__name__}: {exc})")
    frames = loaded.arch["segment_length"] + loaded.arch["right_context_length"]
    x = torch.randn(1, frames, loaded.arch["input_dim"])
    length = torch.tensor([frames])
    states = {k: None for k in variants}
    times = {k: [] for k in variants}
    names = list(variants)
    with torch.inference_mode():
        for i in range(args.chunks + 5):
            order = names[i % len(names):] + names[: i % len(names)]
            for name in order:
                t0 = time.perf_counter_ns()
                _, _, states[name] = variants[name].transcriber.infer(x, length, states[name])
                if i >= 5:
                    times[name].append(time.perf_counter_ns() - t0)
    print(f"{loaded.name} encoder, {frames} frames per chunk, {args.threads} threads, {args.chunks} chunks each")
    for name in names:
        ratios = [a / b for a, b in zip(times["fp32"], times[name])]
        lo, hi = bootstrap_ci(ratios, stat=statistics.median)
        print(f"  {name:<18} {statistics.median(times[name]) / 1e6:8.2f} ms   speedup vs fp32 "
              f"{statistics.median(ratios):.2f}x [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    main()

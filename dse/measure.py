"""Measure one configuration: ``python -m dse.measure``.

Streams the eval split through the configuration the flags describe, chunk by chunk as
a live stream would deliver it, and prints RTF (mean with its 95 % interval, p50, p95),
chunk latency (p50/p95/p99), time to first token, peak memory, and the WER and CER of
that same pass (not measured with random weights). :mod:`dse.core.measure` defines each
figure. A one-utterance eval set gets no interval (``null`` in ``--json``): one sample has
no spread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from dse.core.errors import DSEError, cli_error, exit_with, not_empty
from dse.core.measure import load_eval_audio, machine_fingerprint, measure


def _format_table(record: dict) -> str:
    def fmt(v, unit=""):
        if v is None:
            return "not measured"
        if isinstance(v, float):
            return f"{v:.4g}{unit}"
        return f"{v}{unit}"

    def interval(ci) -> str:
        if ci:
            return f"[{ci[0]:.4f}, {ci[1]:.4f}]"
        return "(no interval: one utterance)" if record["utterances"] == 1 else "(no interval)"

    rows = [
        ("model", record["model"]), ("weights", record["weights"]), ("params", fmt(record["params"])),
        ("weight MiB", fmt(record["weight_mib"])), ("precision", record["precision"]),
        ("backend", record.get("backend", "torch")),
        ("beam width", record["beam_width"]), ("LM weight", record.get("lm_weight", 0.0)),
        ("decoder temperature", record.get("temperature", 1.0)),
        ("utterances / audio", f"{record['utterances']} / {record['audio_s']:.1f} s"),
        ("RTF mean [95% CI]", f"{record['rtf_mean']:.4f} {interval(record['rtf_mean_ci95'])}"),
        ("RTF p50 / p95", f"{record['rtf_p50']:.4f} / {record['rtf_p95']:.4f}"),
        ("chunk latency p50/p95/p99", f"{record['chunk_latency_p50_ms']:.2f} / {record['chunk_latency_p95_ms']:.2f} / "
                                      f"{record['chunk_latency_p99_ms']:.2f} ms"),
        ("TTFT median / p95", f"{fmt(record['ttft_s'], ' s')} / {fmt(record['ttft_p95_s'], ' s')}"),
        ("peak RSS", f"{record['peak_rss_mib']:.0f} MiB"),
        ("build / export / compile", f"{record['build_s']:.1f} s / "
                                     + ("not exported" if record.get("export_s") is None else
                                        f"{record['export_s']:.1f} s" + (" (export cache hit)" if record.get(
                                            "export_cache_hit") else "")) + " / "
                                     + ("not compiled" if record.get("compile_s") is None else
                                        f"{record['compile_s']:.1f} s, {record.get('compile_graphs')} graphs, "
                                        f"{record.get('recompiles')} recompiled while timed")),
        ("threads", _threads(record)),
        ("other processes' load", f"{record['other_cpu_load']:.2f} cores" if record.get("other_cpu_load") is not None
         else "not measured"),
        ("WER [95% CI]", fmt(record["wer"]) if record["wer"] is None else
         f"{record['wer']:.4f} {interval(record.get('wer_ci95'))}"),
        ("CER", fmt(record["cer"])),
    ]
    for s, w in record.get("wer_by_slice", {}).items():
        rows.append((f"WER [{s}]", fmt(w)))
    rows.append(("machine", f"{record['machine']['cpu_model']}, {record['machine']['cpu_count']} cores, "
                            f"torch {record['machine']['torch']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if record.get("spread_warning"):
        lines.append(f"warning: {record['spread_warning']}")
    if record.get("load_warning"):
        lines.append(f"warning: {record['load_warning']}")
    if record.get("skipped"):
        lines.append(f"skipped {len(record['skipped'])} bad utterance(s):")
        lines += [f"  {s}" for s in record["skipped"]]
    return "\n".join(lines)


def _threads(record: dict) -> str:
    t = record.get("threading") or {}
    text = f"{record['threads']} (torch {t.get('torch_threads', '?')}, OMP_WAIT_POLICY {t.get('omp_wait_policy', '?')}"
    if t.get("ort_threads") is not None:
        text += f"; ONNX Runtime {t['ort_threads']}, spinning {'on' if t['ort_spinning'] else 'off'}"
        if t.get("ort_decoder_threads") not in (None, t["ort_threads"]):
            text += f", predictor and joiner {t['ort_decoder_threads']}"
    return text + ")"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="architecture name (base, small, tiny) or a checkpoint path; "
                                   "default: the shipped default model")
    p.add_argument("--weights", help="'random', a dse checkpoint, or a directory with torchaudio's "
                                     "EMFORMER_RNNT_BASE_LIBRISPEECH files; default random for an architecture name")
    p.add_argument("--lm", help="character language model file (.lm.gz) for --lm-weight; default: the one "
                                "beside the checkpoint (the embedded default ships one)")
    p.add_argument("--eval-set", help="JSONL manifest or LibriSpeech directory; default: the shipped eval split")
    p.add_argument("--limit", type=int, help="use only the first N utterances")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights")


def main(argv=None) -> int:
    from dse.core.config import add_config_arguments, config_from_args
    from dse.core.build import build_recognizer

    p = argparse.ArgumentParser(prog="python -m dse.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: give 1 or more utterances")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed {args.seed}: give a whole number from 0 to {2**63 - 1}")
    if args.adapt_steps:
        p.error(f"--adapt-steps {args.adapt_steps}: dse.measure measures weights as they are; adaptation runs in a "
                "study (python -m dse.run with adapt_steps in its space), and dse.export writes the adapted weights")
    try:
        from dse.core.models import DEFAULT_EVAL, load_model, with_lm

        loaded = with_lm(load_model(args.model, args.weights, args.seed), args.lm)
        config = config_from_args(args, loaded)
        eval_set = not_empty(args.eval_set, "--eval-set", "a JSONL manifest or a LibriSpeech directory") or DEFAULT_EVAL
        if not args.eval_set and not os.path.exists(eval_set):
            raise DSEError(f"no --eval-set given and the shipped eval split {eval_set} is missing")
        audio = load_eval_audio(eval_set, args.limit, progress=not args.no_progress)
        torch.set_num_threads(config.threads)
        built = build_recognizer(loaded, config)
        result = measure(built.recognizer, audio, accuracy=loaded.trained, progress=not args.no_progress)
    except DSEError as exc:
        return cli_error(exc)
    record = {"model": loaded.name, "weights": loaded.weights, "params": built.params,
              "weight_mib": built.weight_mib, "precision": config.precision, "backend": config.backend,
              "beam_width": config.beam_width, "lm_weight": config.lm_weight, "temperature": config.temperature,
              "threads": config.threads, "config": config.to_dict(), "machine": machine_fingerprint(),
              "build_s": built.build_s, "export_s": built.export_s,
              "export_cache_hit": built.export_info.get("hit") if built.export_info else None,
              "compile_s": built.compile_s, "compile_graphs": built.compile_graphs, **result}
    if args.json:
        record.pop("transcripts", None)
        print(json.dumps(record))
    else:
        print(_format_table(record))
    return 0


if __name__ == "__main__":
    exit_with(main)

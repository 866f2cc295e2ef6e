"""The vectorised RNN-T search against torchaudio's on the embedded default, same run, interleaved.

    python benchmarks/decoder_speed.py [--utterances 40] [--threads 2]

The default configuration (fp32, beam 4, decoder temperature 2, the shipped LM fused at 0.15)
and greedy search, each built twice: ``search="torchaudio"`` (``RNNTBeamSearch`` with the
project's fused beam search) and the default vectorised search (:mod:`dse.core.decoder`).
Each utterance is streamed by both, in alternating order (:func:`dse.core.measure.interleaved_speedup`);
printed: the median per-utterance speedup with its bootstrap 95 % interval, each side's RTF,
whether the transcripts are identical, and the other processes' load during the run; then the
milliseconds per chunk each spends in the search and in the encoder (from the accuracy passes).
Last, backend onnxruntime at fp32: the predictor and joiner in ONNX Runtime against the same
recognizer with torch's, interleaved, with each one's search time per chunk; and that ONNX
Runtime recognizer against the default configuration as it ran before the vectorised search and
the ONNX backend (torch fp32, torchaudio's search), with the transcripts compared.
"""
from __future__ import annotations

import argparse
from typing import NamedTuple

import torch

from dse.core.build import assemble, deploy, edit_architecture
from dse.core.config import TrialConfig, fill_defaults
from dse.core.measure import OtherCpuLoad, interleaved_speedup, load_eval_audio, machine_fingerprint, measure
from dse.core.models import DEFAULT_EVAL, load_model
from stream_base import Breakdown  # benchmarks/ is this script's directory


def n_chunks(result: dict) -> int:
    return result["chunks"]


def recognizer(loaded, config: TrialConfig, search: str):
    edited = edit_architecture(loaded, config)
    cfg = config.resolved(loaded.arch)
    rec = assemble(deploy(edited.model, cfg), edited.logmel(), edited.tokenizer, cfg, lm_path=edited.lm_path)
    if search == "torchaudio":  # the same recognizer with torchaudio's search
        from dse.core.stream import StreamingRecognizer
        rec = StreamingRecognizer(rec.model, rec.logmel, rec.tokenizer, cfg.segment_frames, cfg.right_context_frames,
                                  beam_width=cfg.beam_width, lm=rec.decoder.lm, lm_weight=cfg.lm_weight,
                                  temperature=cfg.temperature, search="torchaudio", threads=rec.threads)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    audio = load_eval_audio(DEFAULT_EVAL, args.utterances)
    m = machine_fingerprint()
    print(f"{m['cpu_model']}, {args.threads} threads, OMP_WAIT_POLICY {m['omp_wait_policy']}, "
          f"{len(audio.waveforms)} eval utterances")
    has_lm = loaded.lm_path is not None
    for label, values in (("default (beam 4, T 2, LM 0.15)", {}), ("greedy", {"beam_width": 1})):
        config = TrialConfig(**fill_defaults(dict(values, threads=args.threads), has_lm))
        r = paired(recognizer(loaded, config, "vectorised"), recognizer(loaded, config, "torchaudio"), audio)
        print(f"  {label}: vectorised {r.speedup} torchaudio's speed; RTF {r.a['rtf_mean']:.4f} against "
              f"{r.b['rtf_mean']:.4f}; {r.agreement}")
        v, t = r.ms
        print(f"    ms per chunk (one measure pass each, not interleaved): search {v['search']:.2f} against "
              f"{t['search']:.2f} ({t['search'] / v['search']:.2f}x), encoder {v['encoder']:.2f} / {t['encoder']:.2f}")

    # The predictor and joiner in ONNX Runtime (backend onnxruntime) against the same recognizer
    # with torch's predictor and joiner: the default configuration with the ONNX encoder, fp32.
    config = TrialConfig(**fill_defaults({"threads": args.threads, "backend": "onnxruntime"}, has_lm))
    ort = recognizer(loaded, config, "vectorised")
    r = paired(ort, torch_predictor_and_joiner(ort, edit_architecture(loaded, config).model), audio)
    print(f"  backend onnxruntime, fp32 (beam 4, LM): predictor and joiner in ONNX Runtime {r.speedup} the speed "
          f"with torch's; search {r.ms[0]['search']:.2f} against {r.ms[1]['search']:.2f} ms per chunk; {r.agreement}")

    # The same ONNX Runtime recognizer against the default configuration as it ran before the
    # vectorised search and the ONNX backend: torch (fp32) and torchaudio's search.
    before = recognizer(loaded, TrialConfig(**fill_defaults({"threads": args.threads}, has_lm)), "torchaudio")
    r = paired(ort, before, audio)
    print(f"  backend onnxruntime, fp32, vectorised (beam 4, LM) against torch fp32 with torchaudio's search: "
          f"{r.speedup}; RTF {r.a['rtf_mean']:.4f} against {r.b['rtf_mean']:.4f}; {r.agreement}")


class Paired(NamedTuple):
    speedup: str      # median per-utterance ratio and its 95 % interval, interleaved
    a: dict           # the candidate's accuracy pass (dse.core.measure.measure)
    b: dict           # the reference's
    ms: tuple         # ms per chunk in the encoder and the search, candidate then reference
    agreement: str    # identical transcripts, WER, other processes' load


def paired(candidate, reference, audio) -> Paired:
    """``candidate`` against ``reference``: the interleaved speedup, then one accuracy pass each (warm
    from the interleaved passes) with the milliseconds per chunk in the encoder and the search."""
    with OtherCpuLoad() as load:
        ratio = interleaved_speedup(candidate, reference, audio)
    parts = [Breakdown(candidate), Breakdown(reference)]
    a, b = (measure(rec, audio, accuracy=True, warmup=False) for rec in (candidate, reference))
    ms = tuple({part: v * 1000 / n_chunks(result) for part, v in br.seconds.items()} for br, result in zip(parts, (a, b)))
    for br in parts:
        br.detach()
    same = sum(x["hyp"] == y["hyp"] for x, y in zip(a["transcripts"], b["transcripts"]))
    ci = ratio["speedup_ci95"]
    return Paired(f"{ratio['speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]", a, b, ms,
                  f"identical transcripts {same}/{len(audio.waveforms)}; WER {a['wer']:.3f} / {b['wer']:.3f}; "
                  f"other processes' load {load.other_cores:.2f} cores")


def torch_predictor_and_joiner(rec, model):
    """The recognizer ``rec`` (ONNX Runtime encoder, predictor and joiner) with ``model``'s torch
    predictor and joiner instead: everything else (encoder session, features, search) the same."""
    import copy

    from dse.core.stream import StreamingRecognizer

    hybrid = copy.copy(rec.model)
    hybrid._modules = dict(rec.model._modules)
    hybrid.predictor, hybrid.joiner = model.predictor.eval(), model.joiner.eval()
    d = rec.decoder
    return StreamingRecognizer(hybrid, rec.logmel, rec.tokenizer, rec.segment_length, rec.right_context_length,
                               beam_width=rec.beam_width, lm=d.lm, lm_weight=d.lm_weight, temperature=d.temperature,
                               threads=rec.threads)


if __name__ == "__main__":
    main()

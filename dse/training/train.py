"""Train an Emformer RNN-T on a corpus: ``python -m dse.train --preset small --corpus DIR``.

RNN-T loss (``torchaudio.functional.rnnt_loss``) plus an auxiliary CTC loss on the
transcriber output, character vocabulary, the same segment/right-context geometry the
model streams with (Emformer's training forward masks attention block by block, so a
trained model sees exactly the context it will see when streaming), learning-rate
warm-up then cosine decay, gradient clipping, SpecAugment-style masking, periodic
streaming-WER validation on a dev subset of the adapt split, and resumable state:
everything needed to continue (weights, optimiser, step, data order) is written to
``--state-dir`` every ``--save-every`` steps, and re-running the same command resumes.

Batches are padded so the time-reduced length is exact: each utterance is padded with
silence frames to a multiple of the time-reduction stride, the longest one sets the
batch length, and ``right_context_length`` silence frames follow, as in streaming.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from dse.core.audio import read_audio
from dse.core.datasets import read_manifest
from dse.core.errors import DSEError, cli_error
from dse.core.features import FeatureConfig, LogMel
from dse.core.rnnt import collate, make_batches, rnnt_step_loss, silence_frame, streaming_wer
from dse.core.models import (CharTokenizer, LoadedModel, architecture, average_weights, build, file_sha256,
                        load_checkpoint, save_checkpoint, widen_ffn)


@dataclasses.dataclass
class Preset:
    arch: str
    peak_lr: float = 1e-3
    warmup_steps: int = 500
    max_steps: int = 8000
    max_batch_frames: int = 6000
    ctc_weight: float = 0.3
    specaug_from_step: int = 1000
    weight_decay: float = 1e-3
    grad_clip: float = 5.0
    dropout: float = 0.0   # training-time dropout in every Dropout module (Emformer layers, predictor output)
    vtlp: float = 0.0      # vocal-tract-length perturbation: warp factor drawn from [1 - vtlp, 1 + vtlp]
    eq_db: float = 0.0     # random smooth equaliser: each utterance's spectral envelope tilted by up to this many dB


PRESETS = {
    "small": Preset(arch="small", max_steps=5000),
    # ``small`` with 2,048 FFN units per Emformer layer, grown from a ``small`` checkpoint with --init
    "small-wide": Preset(arch="small-wide", max_steps=5000),
    "tiny": Preset(arch="tiny", peak_lr=2e-3, warmup_steps=20, max_steps=200, max_batch_frames=2000,
                   specaug_from_step=10**9),
}


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator,
                 freq_masks=2, freq_width=15, time_masks=2, time_width_ratio=0.05) -> torch.Tensor:
    """Mask ``freq_masks`` mel bands and ``time_masks`` time spans per utterance (in place)."""
    b, t, d = x.shape
    for i in range(b):
        for _ in range(freq_masks):
            w = int(torch.randint(0, freq_width + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, d - w), (1,), generator=gen))
            x[i, :, f0:f0 + w] = 0.0
        n = int(lengths[i])
        for _ in range(time_masks):
            w = int(torch.randint(0, max(1, int(n * time_width_ratio)) + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, max(1, n - w), (1,), generator=gen))
            x[i, t0:t0 + w] = 0.0
    return x


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def vtlp_source_bins(n_mels: int, sample_rate: int, alpha: float, boundary: float = 0.85) -> torch.Tensor:
    """Fractional source bin ``(n_mels,)`` that each warped mel bin reads, for warp factor ``alpha``.

    Vocal-tract-length perturbation (Jaitly and Hinton, 2013) as a piecewise-linear warp of
    the frequency axis: content at ``f`` Hz moves to ``alpha * f`` below ``boundary`` times
    the Nyquist frequency, and a second line keeps the Nyquist frequency where it is. The
    mel bins are those of torchaudio's HTK mel scale from 0 Hz to Nyquist.
    """
    nyquist = sample_rate / 2
    mel_points = torch.linspace(0.0, float(_hz_to_mel(torch.tensor(nyquist))), n_mels + 2, dtype=torch.float64)
    centres_hz = _mel_to_hz(mel_points[1:-1])
    knee = boundary * nyquist * min(1.0, alpha)  # a warped frequency below this came from knee/alpha
    low = centres_hz / alpha
    # Above the knee: the line from (knee, knee / alpha) to (nyquist, nyquist).
    high = knee / alpha + (centres_hz - knee) * (nyquist - knee / alpha) / (nyquist - knee)
    source_hz = torch.where(centres_hz <= knee, low, high)
    source_mel = _hz_to_mel(source_hz)
    step = mel_points[1] - mel_points[0]
    return ((source_mel - mel_points[1]) / step).clamp(0, n_mels - 1).float()


def warp_frequency(raw: torch.Tensor, alpha: float, sample_rate: int = 16000) -> torch.Tensor:
    """Un-normalised log-mel ``(T, n_mels)`` with its frequency axis warped by ``alpha``
    (linear interpolation between neighbouring bins; ``alpha > 1`` moves formants up)."""
    d = raw.size(-1)
    src = vtlp_source_bins(d, sample_rate, alpha)
    lo = src.floor().long()
    hi = (lo + 1).clamp_max(d - 1)
    frac = src - lo
    return raw[..., lo] * (1 - frac) + raw[..., hi] * frac


def vtlp(x: torch.Tensor, gen: torch.Generator, max_warp: float, mean: torch.Tensor, invstd: torch.Tensor,
         sample_rate: int = 16000) -> torch.Tensor:
    """Warp the frequency axis of each utterance of a normalised log-mel batch ``(B, T, n_mels)``.

    Each utterance draws its factor uniformly from ``[1 - max_warp, 1 + max_warp]``; the
    warp acts on the un-normalised log energies (``mean`` and ``invstd``, ``(n_mels,)``)
    and the result is normalised again. A new voice's formants sit where no training
    voice put them: this moves them.
    """
    raw = x / invstd + mean
    for i in range(x.size(0)):
        alpha = 1.0 + (2.0 * float(torch.rand((), generator=gen)) - 1.0) * max_warp
        raw[i] = warp_frequency(raw[i], alpha, sample_rate)
    return (raw - mean) * invstd


def eq_curves(n_utts: int, n_mels: int, gen: torch.Generator, max_db: float, n_terms: int = 3) -> torch.Tensor:
    """Random smooth gains in dB ``(n_utts, n_mels)``, each within ``[-max_db, max_db]``.

    A curve is a sum of the first ``n_terms`` cosines over the mel axis (a tilt, a bowl,
    a wave), each with a uniform weight in ``[-max_db / n_terms, max_db / n_terms]``, so
    that no bin moves by more than ``max_db``.
    """
    k = torch.arange(1, n_terms + 1, dtype=torch.float32)
    m = torch.linspace(0.0, 1.0, n_mels)
    basis = torch.cos(math.pi * k[:, None] * m[None, :])  # (n_terms, n_mels)
    weights = (2.0 * torch.rand(n_utts, n_terms, generator=gen) - 1.0) * (max_db / n_terms)
    return weights @ basis


def random_eq(x: torch.Tensor, gen: torch.Generator, max_db: float, mean: torch.Tensor,
              invstd: torch.Tensor) -> torch.Tensor:
    """Pass each utterance of a normalised log-mel batch ``(B, T, n_mels)`` through its own
    smooth equaliser (:func:`eq_curves`): another voice's timbre, another microphone.

    The gain is added where the un-normalised features are in the log region of the
    piecewise-linear compression (above 1), i.e. to speech energy, not to digital silence;
    a gain of ``g`` dB on power is ``g * ln(10) / 10`` in natural-log units.
    """
    raw = x / invstd + mean
    gains = eq_curves(x.size(0), x.size(-1), gen, max_db) * (math.log(10.0) / 10.0)
    raw = torch.where(raw > 1.0, raw + gains[:, None, :], raw)
    return (raw - mean) * invstd


def compute_global_stats(paths: list[Path], config: FeatureConfig, limit: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and inverse std ``(n_mels,)`` of raw log-mel over up to ``limit`` files."""
    logmel = LogMel(config)
    total, total_sq, count = 0, 0, 0
    for p in paths[:limit]:
        f = logmel.raw(read_audio(p))
        total = total + f.sum(0)
        total_sq = total_sq + (f ** 2).sum(0)
        count += f.size(0)
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-8).sqrt()
    return mean, 1.0 / std


def extract_all(manifest: Path, logmel: LogMel, tokenizer: CharTokenizer, cache: Path):
    """Features (fp16) and token ids of every utterance, cached in ``cache``."""
    from tqdm import tqdm

    if cache.exists():
        return torch.load(cache, weights_only=False)
    utts = read_manifest(manifest)
    feats, targets, skipped = [], [], []
    for u in tqdm(utts, desc=f"features {manifest.name}", unit="utt"):
        try:
            feats.append(logmel(read_audio(u.path)).half())
            targets.append(tokenizer.encode(u.text))
        except DSEError as exc:
            skipped.append(str(exc))
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    data = {"feats": feats, "targets": targets}
    torch.save(data, cache)
    return data


def set_dropout(model: torch.nn.Module, p: float) -> int:
    """Set every ``nn.Dropout`` of ``model`` to ``p`` (training only: the architecture and the
    exported model are unchanged, evaluation disables dropout). Returns how many were set."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            n += 1
    return n


def lr_at(step: int, preset: Preset) -> float:
    if step < preset.warmup_steps:
        return preset.peak_lr * (step + 1) / preset.warmup_steps
    progress = min(1.0, (step - preset.warmup_steps) / max(1, preset.max_steps - preset.warmup_steps))
    return preset.peak_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> Path:
    preset = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in
                                 (("max_steps", args.max_steps), ("peak_lr", args.lr), ("dropout", args.dropout),
                                  ("vtlp", args.vtlp), ("eq_db", args.eq_db), ("warmup_steps", args.warmup_steps))
                                 if v is not None})
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    corpora = [Path(c) for c in args.corpus]
    corpus = corpora[0]
    tokenizer = CharTokenizer()
    fcfg = FeatureConfig()
    arch = architecture(preset.arch)

    init = None
    init_names = " + ".join(args.init or [])
    if args.init and not (state_dir / "last.pt").exists():
        init = load_checkpoint(args.init[0])
        if len(args.init) > 1:
            init = average_weights([init] + [load_checkpoint(path) for path in args.init[1:]])
            print(f"averaged the weights of {init_names}", file=sys.stderr)
        if (init.arch != arch and dict(init.arch, transformer_ffn_dim=arch["transformer_ffn_dim"]) == arch
                and init.arch["transformer_ffn_dim"] < arch["transformer_ffn_dim"]):
            print(f"growing {init_names}'s FFNs from {init.arch['transformer_ffn_dim']} to "
                  f"{arch['transformer_ffn_dim']} units (new units start silent)", file=sys.stderr)
            init = widen_ffn(init, arch["transformer_ffn_dim"], seed=args.seed)
        if init.arch != arch or init.tokenizer.to_dict() != tokenizer.to_dict():
            raise DSEError(f"--init {init_names} is a {init.name!r} model with another architecture or vocabulary "
                           f"than preset {args.preset!r}; start from a checkpoint of the same preset (or, for a wider "
                           "FFN, of the same architecture otherwise)")
    stats_path = state_dir / "global_stats.json"
    if init is not None:
        # The warm-started weights expect the features normalised as they were trained, and
        # feature caches already in the folder were normalised with the folder's statistics.
        init_stats = {"mean": init.mean.tolist(), "invstd": init.invstd.tolist()}
        if stats_path.exists() and json.loads(stats_path.read_text()) != init_stats:
            raise DSEError(f"{state_dir} holds features normalised otherwise than {init_names} was trained; "
                           "start the warm start in a new --state-dir")
        stats_path.write_text(json.dumps(init_stats))
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        mean, invstd = torch.tensor(stats["mean"]), torch.tensor(stats["invstd"])
    else:
        train_utts = read_manifest(corpus / "train.jsonl")
        rng = random.Random(0)
        sample = [u.path for u in rng.sample(train_utts, min(2000, len(train_utts)))]
        mean, invstd = compute_global_stats(sample, fcfg)
        stats_path.write_text(json.dumps({"mean": mean.tolist(), "invstd": invstd.tolist()}))
    logmel = LogMel(fcfg, mean, invstd)
    data = {"feats": [], "targets": []}
    for c in corpora:
        manifest = c / "train.jsonl"
        if not manifest.exists():
            raise DSEError(f"{manifest} not found: --corpus takes folders made by python -m dse.corpus")
        part = extract_all(manifest, logmel, tokenizer, state_dir / f"features-{file_sha256(manifest)[:12]}.pt")
        data["feats"] += part["feats"]
        data["targets"] += part["targets"]
    dev = read_manifest(corpus / "adapt.jsonl")[: args.dev_size]
    pad_frame = silence_frame(logmel)
    lengths = [f.size(0) for f in data["feats"]]

    torch.manual_seed(args.seed)
    model = build(arch, tokenizer.num_symbols)
    if init is not None:
        model.load_state_dict(init.model.state_dict())
        print(f"initialised from {init_names}", file=sys.stderr)
    model = model.to(device)
    set_dropout(model, preset.dropout)
    ctc_head = torch.nn.Linear(arch["encoding_dim"], tokenizer.num_symbols).to(device)
    params = list(model.parameters()) + list(ctc_head.parameters())
    opt = torch.optim.AdamW(params, lr=preset.peak_lr, betas=(0.9, 0.98), weight_decay=preset.weight_decay)
    step, history = 0, []
    ckpt = state_dir / "last.pt"
    if ckpt.exists():
        blob = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(blob["model"])
        ctc_head.load_state_dict(blob["ctc_head"])
        opt.load_state_dict(blob["opt"])
        step, history = blob["step"], blob["history"]
        print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed + step)

    def loaded_model() -> LoadedModel:
        m = build(arch, tokenizer.num_symbols)
        m.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return LoadedModel(preset.arch, arch, m.eval(), tokenizer, fcfg, mean, invstd, "checkpoint",
                           {"train_steps": step, "preset": args.preset})

    def in_average_window(s: int) -> bool:
        return bool(args.average_last) and (s % args.save_every == 0 or s == preset.max_steps) \
            and s > preset.max_steps - args.average_last * args.save_every

    def save():
        if in_average_window(step):
            # Written before last.pt: a run interrupted between the two resumes at the previous
            # save and rewrites this file with the same weights.
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                       state_dir / f"weights-{step:06d}.pt")
        blob = {"model": model.state_dict(), "ctc_head": ctc_head.state_dict(), "opt": opt.state_dict(),
                "step": step, "history": history}
        torch.save(blob, state_dir / "last.tmp")
        os.replace(state_dir / "last.tmp", ckpt)

    def epoch_batches(epoch):
        return make_batches(lengths, preset.max_batch_frames, random.Random(args.seed * 1000 + epoch))

    if args.average_last:
        gone = [s for s in range(1, step + 1)
                if in_average_window(s) and not (state_dir / f"weights-{s:06d}.pt").exists()]
        if gone:
            raise DSEError(f"--average-last {args.average_last}: this run resumes at step {step}, after steps {gone} "
                           f"whose weights it did not keep; lower N or train from an earlier state")
    batches_per_epoch = len(epoch_batches(0))
    t_start = time.time()
    model.train()
    batches, batches_epoch = None, -1
    while step < preset.max_steps:
        epoch, index = divmod(step, batches_per_epoch)
        if batches_epoch != epoch:
            batches, batches_epoch = epoch_batches(epoch), epoch
        idx = batches[index]
        batch = collate([data["feats"][i] for i in idx], [data["targets"][i] for i in idx],
                        arch["time_reduction_stride"], arch["right_context_length"], pad_frame)
        if preset.vtlp > 0:
            batch = (vtlp(batch[0], gen, preset.vtlp, mean, invstd, fcfg.sample_rate),) + batch[1:]
        if preset.eq_db > 0:
            batch = (random_eq(batch[0], gen, preset.eq_db, mean, invstd),) + batch[1:]
        if step >= preset.specaug_from_step:
            spec_augment(batch[0], batch[1], gen)
        batch = tuple(t.to(device) for t in batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, preset)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, logits = rnnt_step_loss(model, ctc_head, batch, tokenizer.blank, preset.ctc_weight)
        if not torch.isfinite(loss):
            raise DSEError(f"loss became {loss.item()} at step {step}; lower --lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, preset.grad_clip)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            elapsed = time.time() - t_start
            print(f"step {step}/{preset.max_steps} epoch {epoch} loss {loss.item():.3f} grad {grad_norm:.2f} "
                  f"lr {lr_at(step, preset):.2e} {elapsed / args.log_every:.2f}s/step", file=sys.stderr, flush=True)
            history.append({"step": step, "loss": loss.item(), "time": time.time()})
            t_start = time.time()
        if step % args.save_every == 0 or step == preset.max_steps:
            save()
        if step % args.eval_every == 0 or step == preset.max_steps:
            model.eval()
            res = streaming_wer(loaded_model(), dev, beam_width=1)
            model.train()
            history.append({"step": step, "dev_wer": res["wer"], "dev_cer": res["cer"]})
            print(f"step {step}: dev streaming greedy WER {res['wer']:.3f} CER {res['cer']:.3f} "
                  f"(n={res['n']}) ref={res['example'][0]!r} hyp={res['example'][1]!r}", file=sys.stderr, flush=True)
            save()
            t_start = time.time()
    out = Path(args.export) if args.export else state_dir / "model.pt"
    final = loaded_model()
    extra = {"history": history[-50:]}
    if args.average_last:
        steps = sorted(s for s in range(1, preset.max_steps + 1) if in_average_window(s))
        missing = [s for s in steps if not (state_dir / f"weights-{s:06d}.pt").exists()]
        if missing:
            raise DSEError(f"--average-last {args.average_last}: the weights of steps {missing} are not in "
                           f"{state_dir} (the run began without --average-last, or after those steps)")
        snapshots = []
        for s in steps:
            m = build(arch, tokenizer.num_symbols)
            m.load_state_dict(torch.load(state_dir / f"weights-{s:06d}.pt", map_location="cpu"))
            snapshots.append(dataclasses.replace(final, model=m.eval(), weights=f"step {s}"))
        final = dataclasses.replace(average_weights(snapshots), weights="checkpoint")
        res = streaming_wer(final, dev, beam_width=1)
        extra["averaged_steps"] = steps
        print(f"averaged the weights of steps {steps[0]}-{steps[-1]} ({len(steps)} saves): dev streaming greedy "
              f"WER {res['wer']:.3f} CER {res['cer']:.3f}", file=sys.stderr, flush=True)
    save_checkpoint(out, final, half=True, extra=extra)
    print(f"wrote {out}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dse.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="architecture and schedule")
    p.add_argument("--corpus", required=True, action="append",
                   help="folder made by python -m dse.corpus (train.jsonl, adapt.jsonl); repeat it to train on the "
                        "union of several corpora's train splits (the first one's adapt split is the dev set and "
                        "its train split sets the feature normalisation)")
    p.add_argument("--state-dir", required=True, help="resumable training state (outside the repository)")
    p.add_argument("--export", help="where to write the compact fp16 checkpoint at the end")
    p.add_argument("--max-steps", type=int, help="override the preset's number of optimiser steps")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    p.add_argument("--dropout", type=float,
                   help="override the preset's training dropout (Emformer layers and predictor output; "
                        "0 for the shipped recipe); a regulariser when the dev WER stalls while the loss falls")
    p.add_argument("--init", action="append",
                   help="start from the weights (and feature statistics) of this checkpoint, e.g. "
                        "dse/default/model.pt, when --state-dir holds no training state yet; the step count and "
                        "schedule start at 0 (a warm restart: consider --lr and --warmup-steps). Repeat it to start "
                        "from the average of several checkpoints' weights. A checkpoint whose FFNs are narrower "
                        "than the preset's (small for small-wide) is grown with the new units silent")
    p.add_argument("--warmup-steps", type=int, help="override the preset's learning-rate warm-up")
    p.add_argument("--vtlp", type=float,
                   help="vocal-tract-length perturbation: warp each utterance's frequency axis by a factor drawn "
                        "from [1 - VTLP, 1 + VTLP] (0.1 is usual; default off)")
    p.add_argument("--eq-db", type=float,
                   help="random smooth equaliser: tilt each utterance's spectral envelope by up to EQ_DB dB "
                        "(a sum of three cosines over the mel axis; default off)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the forward pass (weights, optimiser and losses stay fp32): "
                        "1.4x to 2x faster steps on a CPU with AVX-512 bf16 (benchmarks/train_step.py)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev-size", type=int, default=60, help="adapt-split utterances used for validation")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--average-last", type=int, metavar="N",
                   help="export the element-wise mean of the weights at the last N saves (one every --save-every "
                        "steps, ending at the last step) instead of the last weights alone; each of those saves "
                        "also writes weights-STEP.pt to --state-dir")
    p.add_argument("--eval-every", type=int, default=1000)
    args = p.parse_args(argv)
    if args.average_last is not None and args.average_last < 1:
        p.error(f"--average-last {args.average_last}: give a number of saves, 1 or more")
    try:
        train(args)
    except DSEError as exc:
        return cli_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RNN-T training steps shared by the trainer and the adaptation of edited models:
padding a batch, length-bucketed batches, the RNN-T (+ CTC) loss, and the streaming WER
of a model on a few utterances (the path :mod:`dse.core.measure` times)."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
import torchaudio

from dse.core.audio import read_audio
from dse.core.features import LogMel
from dse.core.models import LoadedModel


def silence_frame(logmel: LogMel) -> torch.Tensor:
    """The normalised feature vector ``(n_mels,)`` of digital silence."""
    return (torch.zeros(logmel.config.n_mels) - logmel.mean) * logmel.invstd


def collate(feats: list[torch.Tensor], targets: list[list[int]], stride: int, right_context: int,
            pad_frame: torch.Tensor):
    """Pad a batch. Returns (features (B, T + rc, D), lengths (B,), targets (B, U), target_lengths (B,)).

    ``T`` is a multiple of ``stride`` equal to the longest padded utterance, so the
    time-reduced length of that utterance is exactly ``T // stride``.
    """
    lengths = torch.tensor([math.ceil(f.size(0) / stride) * stride for f in feats])
    t_max = int(lengths.max())
    batch = pad_frame.expand(len(feats), t_max + right_context, pad_frame.numel()).clone()
    for i, f in enumerate(feats):
        batch[i, : f.size(0)] = f.float()
    u_max = max(len(t) for t in targets)
    tgt = torch.zeros(len(targets), u_max, dtype=torch.int32)
    for i, t in enumerate(targets):
        tgt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return batch, lengths.int(), tgt, torch.tensor([len(t) for t in targets], dtype=torch.int32)


def rnnt_step_loss(model, ctc_head, batch, blank: int, ctc_weight: float):
    """RNN-T (+ CTC) loss per target token for one padded batch.

    The transcriber runs once: its output feeds both the joiner and the CTC head.
    """
    feats, lengths, targets, target_lengths = batch
    prepended = F.pad(targets, (1, 0), value=blank)
    enc, enc_lengths = model.transcribe(feats, lengths)
    pred, pred_lengths, _ = model.predict(prepended, target_lengths + 1, None)
    logits, logit_lengths, _ = model.join(enc, enc_lengths, pred, pred_lengths)
    n_tokens = target_lengths.sum().clamp_min(1)
    # The losses run in fp32 whatever precision the forward pass used (autocast).
    logits = logits.float()
    loss = torchaudio.functional.rnnt_loss(logits, targets, logit_lengths.int(), target_lengths, blank=blank,
                                           reduction="sum") / n_tokens
    if ctc_head is not None and ctc_weight > 0:
        log_probs = ctc_head(enc).float().log_softmax(-1).transpose(0, 1)
        ctc = F.ctc_loss(log_probs, targets, enc_lengths, target_lengths, blank=blank, reduction="sum",
                         zero_infinity=True) / n_tokens
        loss = (1 - ctc_weight) * loss + ctc_weight * ctc
    return loss, logits


def make_batches(lengths: list[int], max_frames: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of at most ``max_frames`` padded frames, in shuffled order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and m * (len(cur) + 1) > max_frames:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def streaming_wer(loaded: LoadedModel, utts, beam_width: int = 1, limit: int | None = None) -> dict:
    """Streaming WER/CER of ``loaded`` on ``utts`` (the same path :mod:`dse.core.measure` times), with
    per-utterance ``utterance_errors`` ``[word errors, reference words]`` for paired comparisons."""
    import jiwer
    from dse.core.stream import StreamingRecognizer

    rec = StreamingRecognizer.from_loaded(loaded, beam_width=beam_width)
    refs, hyps = [], []
    for u in utts[:limit]:
        refs.append(u.text)
        hyps.append(rec.transcribe(read_audio(u.path)))
    errors = []
    for ref, hyp in zip(refs, hyps):
        o = jiwer.process_words(ref, hyp)
        errors.append([o.substitutions + o.deletions + o.insertions, o.hits + o.substitutions + o.deletions])
    return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps), "n": len(refs), "example": (refs[0], hyps[0]),
            "utterance_errors": errors}

"""True streaming recognition: audio in, chunk by chunk, state carried, partial text out.

Geometry (all in feature frames of ``hop_samples`` each, before time reduction):
a chunk is ``segment_length + right_context_length`` frames; consecutive chunks
advance by ``segment_length`` frames, so each chunk's last ``right_context_length``
frames (the look-ahead) are the next chunk's first frames. The encoder state and the
decoder hypotheses go from each chunk to the next, exactly as in a loop over
torchaudio's ``RNNTBeamSearch.infer``.

At the end of a stream the audio is padded with digital silence until every frame
that holds real audio has been decoded as part of a segment; see
:func:`flush_padding_samples`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, NamedTuple, Optional

import torch
from torchaudio.models import RNNTBeamSearch

from dse.core.features import StreamingFeatures
from dse.core.geometry import chunk_geometry, flush_padding_samples


class StreamState(NamedTuple):
    """What one chunk hands to the next.

    ``encoder``: the Emformer's internal state (torchaudio's list of lists of tensors);
    ``hypotheses``: the decoder's beam (torchaudio ``Hypothesis`` tuples), best first.
    ``None`` in either starts a stream.
    """
    encoder: Optional[List[List[torch.Tensor]]]
    hypotheses: Optional[list]


@dataclasses.dataclass
class ChunkEvent:
    """One decoded chunk. ``compute_ns`` covers features, encoder and search for this chunk."""
    index: int
    tokens: list[int]          # best hypothesis so far, blank removed
    new_tokens: int            # tokens the best hypothesis gained in this chunk (may be < 0 if the beam switched)
    compute_ns: int
    samples_needed: int        # audio samples that must have arrived before this chunk could run


class StreamingRecognizer:
    """Streams one utterance at a time through an Emformer RNN-T.

    ``model``: a ``torchaudio.models.RNNT``; ``logmel``: a :class:`dse.core.features.LogMel`
    matching the model's training; ``tokenizer``: has ``blank`` and ``decode(ids)``.
    ``beam_width`` 1 is greedy search. ``dtype`` is the dtype the model's weights are in
    (features and state follow it). ``autocast_dtype`` runs each chunk under CPU autocast.
    ``clock`` returns nanoseconds (replaceable in tests). ``lm``: a
    :class:`dse.core.lm.CharNgramLM` fused into the search with ``lm_weight`` (ignored at 0).
    ``temperature``: the joint network's logits are divided by it before the log-softmax
    that scores the search (1 = the model's own distribution). ``search``: ``"vectorised"``
    (:class:`dse.core.decoder.FastRNNTSearch`: every hypothesis of a step in one predictor and
    one joiner call; the same transcripts as torchaudio's search on the whole shipped eval
    split, greedy, beam 4 and beam 4 with the LM) or ``"torchaudio"`` (its ``RNNTBeamSearch``,
    with :class:`dse.core.lm.FusedBeamSearch` for LM fusion; kept as the reference).
    ``threads``: torch's intra-op threads, set whenever audio arrives if the process runs with
    another count (torch's setting is per process; recognizers timed side by side each get
    their own); ``None`` leaves them alone.
    """

    def __init__(self, model, logmel, tokenizer, segment_length: int, right_context_length: int,
                 beam_width: int = 4, dtype: torch.dtype = torch.float32,
                 autocast_dtype: Optional[torch.dtype] = None, clock: Callable[[], int] = time.perf_counter_ns,
                 lm=None, lm_weight: float = 0.0, temperature: float = 1.0, search: str = "vectorised",
                 threads: Optional[int] = None):
        if beam_width < 1:
            raise ValueError(f"beam_width={beam_width} must be at least 1")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive")
        self.model = model
        self.logmel = logmel
        self.tokenizer = tokenizer
        self.segment_length = segment_length
        self.right_context_length = right_context_length
        self.chunk_frames, self.advance_frames = chunk_geometry(segment_length, right_context_length)
        self.beam_width = beam_width
        self.dtype = dtype
        self.autocast_dtype = autocast_dtype
        self.clock = clock
        self.threads = threads
        self.lm_weight = float(lm_weight) if lm is not None else 0.0
        if search == "vectorised":
            from dse.core.decoder import FastRNNTSearch

            self.decoder = FastRNNTSearch.from_tokenizer(model, tokenizer, temperature=temperature,
                                                         lm=lm if self.lm_weight > 0 else None,
                                                         lm_weight=self.lm_weight)
        elif search != "torchaudio":
            raise ValueError(f"search={search!r} is not 'vectorised' or 'torchaudio'")
        elif self.lm_weight > 0:
            from dse.core.lm import FusedBeamSearch

            self.decoder = FusedBeamSearch(model, tokenizer, lm, self.lm_weight, temperature=temperature)
        else:
            self.decoder = RNNTBeamSearch(model, tokenizer.blank, temperature=temperature)
        self._chunk_length = torch.tensor([self.chunk_frames])
        self.reset()

    @classmethod
    def from_loaded(cls, loaded, beam_width: int = 4, **kwargs) -> "StreamingRecognizer":
        arch = loaded.arch
        return cls(loaded.model, loaded.logmel(), loaded.tokenizer, arch["segment_length"],
                   arch["right_context_length"], beam_width=beam_width, **kwargs)

    # -- the live arrival schedule ----------------------------------------------------
    def piece_samples(self) -> tuple[int, int]:
        """(samples of the first piece, samples of every later piece) of a live stream.

        The first piece holds exactly the samples the first chunk needs, each later piece
        one chunk advance (``segment_length * hop_samples`` samples): every piece then
        completes one chunk, which is decoded as soon as its last sample arrives.
        """
        cfg = self.logmel.config
        return cfg.samples_for_frames(self.chunk_frames), self.advance_frames * cfg.hop_samples

    def arrival_pieces(self, num_samples: int) -> list[tuple[int, int]]:
        """``(start, end)`` sample ranges a live stream of ``num_samples`` samples delivers."""
        first, step = self.piece_samples()
        pieces, start, end = [], 0, min(first, num_samples)
        while start < num_samples:
            pieces.append((start, end))
            start, end = end, min(end + step, num_samples)
        return pieces

    # -- stream lifecycle -------------------------------------------------------------
    def initial_encoder_state(self) -> Optional[List[List[torch.Tensor]]]:
        """The Emformer's zero state in the model's dtype.

        torchaudio creates it in the default dtype (float32), which breaks a bf16/fp16
        model on the first chunk, so for those dtypes it is made here and cast.
        """
        if self.dtype == torch.float32:
            return None
        layers = self.model.transcriber.transformer.emformer_layers
        return [[t.to(self.dtype) if t.is_floating_point() else t for t in layer._init_state(1, None)]
                for layer in layers]

    def reset(self) -> None:
        self.features = StreamingFeatures(self.logmel)
        self.state = StreamState(self.initial_encoder_state(), None)
        self._pending = torch.zeros((0, self.logmel.config.n_mels))
        self.chunks_done = 0
        self.samples_in = 0
        self._last_len = 0

    @property
    def tokens(self) -> list[int]:
        hyps = self.state.hypotheses
        if not hyps:
            return []
        best = hyps.best_tokens() if hasattr(hyps, "best_tokens") else hyps[0][0]  # an ONNX search's beam
        return [t for t in best if t != self.tokenizer.blank]

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens)

    @torch.inference_mode()
    def accept_audio(self, samples: torch.Tensor) -> list[ChunkEvent]:
        """Feed ``samples`` ``(n,)`` float audio at the feature rate; decode every completed chunk
        (features included, in inference mode: no autograd bookkeeping on the front end's tensors)."""
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # before the clock: a deployment sets it once
        start = self.clock()
        self.samples_in += samples.numel()
        frames = self.features.push(samples)
        if frames.numel():
            self._pending = torch.cat([self._pending, frames]) if self._pending.numel() else frames
        events = []
        while self._pending.size(0) >= self.chunk_frames:
            chunk = self._pending[: self.chunk_frames]
            self._pending = self._pending[self.advance_frames:]
            events.append(self._decode_chunk(chunk, start))
            start = self.clock()
        return events

    def finish(self) -> list[ChunkEvent]:
        """Pad the stream with silence and decode what remains (see :func:`flush_padding_samples`)."""
        pad = flush_padding_samples(self.samples_in, self.logmel.config, self.segment_length,
                                    self.right_context_length)
        events = self.accept_audio(torch.zeros(pad)) if pad else []
        self.samples_in -= pad
        return events

    def transcribe(self, waveform: torch.Tensor, piece_samples: Optional[int] = None) -> str:
        """Stream a whole utterance ``(samples,)`` in pieces; returns the final text."""
        self.reset()
        piece = piece_samples or self.advance_frames * self.logmel.config.hop_samples
        for i in range(0, waveform.numel(), piece):
            self.accept_audio(waveform[i:i + piece])
        self.finish()
        return self.text

    # -- one chunk ----------------------------------------------------------------------
    # in inference mode: accept_audio, its only caller
    def _decode_chunk(self, chunk: torch.Tensor, start_ns: int) -> ChunkEvent:
        x = chunk.to(self.dtype).unsqueeze(0)
        with torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            hyps, enc_state = self.decoder.infer(x, self._chunk_length, self.beam_width, state=self.state.encoder,
                                                 hypothesis=self.state.hypotheses)
        self.state = StreamState(enc_state, hyps)
        tokens = self.tokens  # timed: a deployment reads them every chunk (an ONNX search's beam builds them now)
        elapsed = self.clock() - start_ns
        event = ChunkEvent(index=self.chunks_done, tokens=tokens, new_tokens=len(tokens) - self._last_len,
                           compute_ns=elapsed,
                           samples_needed=self.logmel.config.samples_for_frames(
                               self.chunks_done * self.advance_frames + self.chunk_frames))
        self._last_len = len(tokens)
        self.chunks_done += 1
        return event

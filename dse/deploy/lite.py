"""Stream a bundle with onnxruntime and numpy alone: no torch, no torchaudio.

For a bundle whose trial ran everything in ONNX Runtime (``backend: onnxruntime``, so it
holds ``encoder.onnx``, ``predictor.onnx`` and ``joiner.onnx``), with greedy or beam search and,
if the trial fused one, the character language model (``lm.lm.gz``). This
module imports numpy, onnxruntime and the standard library only; reading audio files is
the caller's (``soundfile`` does it without torch)::

    from dse.deploy import lite
    recognizer = lite.load("deploy/bundle")
    text = recognizer.transcribe(samples)       # float32 samples at recognizer.sample_rate

What it computes is :class:`dse.core.stream.StreamingRecognizer`'s, in numpy:

* the log-mel front end of :class:`dse.core.features.LogMel` (a periodic Hann window, the
  power spectrum of a 400-point real FFT, torchaudio's HTK mel filterbank without
  normalisation, the piecewise-linear log, the bundle's normalisation statistics), frames not
  centred, so streaming and offline frames agree;
* the chunking and the end-of-stream padding of the streaming recognizer;
* the search, as the torch runtime runs it for these bundles: greedy search without an LM in
  :class:`dse.core.ort_search.OrtGreedy`, anything else (beam search, LM fusion with the rows of
  :class:`dse.core.ngram.LMRows`) in :class:`dse.core.ort_search.OrtBeamSearch`, on ONNX Runtime
  sessions opened as the torch runtime opens them (threads, spinning).

Fed the same features, the two runtimes therefore give the same tokens. The front end is not bit-identical:
numpy's FFT rounds differently from torch's, which matters only in near-silent frames (power
around 1e-10, where the fixed gain of the log lifts rounding noise into the features), and an
int8 model can turn that into another word (on all 240 eval utterances: WER 0.3968 against the
recorded 0.4074, -1.1 pts [95% -1.9, -0.2] paired: systematic on that split, not noise;
measured before the search moved to numpy, not since). ``python -m dse.verify BUNDLE --lite``
scores it against the study's record.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import numpy as np

from dse.core import vocab
from dse.core.errors import DSEError
from dse.core.geometry import LOG_GAIN, FeatureConfig, chunk_geometry, flush_padding_samples
from dse.core.ngram import CharNgramLM, LMRows
from dse.core.ort_search import search_for
from dse.core.ort_session import BackendError, decoder_threads, default_spinning, encoder_layout, open_session
from dse.deploy import bundle

__all__ = ["LiteError", "LiteRecognizer", "load", "needs_torch"]


class LiteError(DSEError):
    """This bundle cannot be streamed without torch, or it is damaged; the message says which and why."""


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """torchaudio's ``melscale_fbanks`` (HTK scale, no normalisation, 0 Hz to Nyquist): ``(n_fft // 2 + 1, n_mels)``."""
    freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    m_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


class LogMel:
    """``LogMel`` of :mod:`dse.core.features` in numpy: samples ``(n,)`` -> features ``(frames, n_mels)``."""

    def __init__(self, config: FeatureConfig, mean, invstd):
        self.config = config
        self.sample_rate, self.window, self.hop, self.n_mels = (
            config.sample_rate, config.window_samples, config.hop_samples, config.n_mels)
        n = np.arange(self.window)
        # periodic, as torch.hann_window; both in float32, where torch computes
        self.hann = (0.5 - 0.5 * np.cos(2 * math.pi * n / self.window)).astype(np.float32)
        self.fbank = mel_filterbank(self.sample_rate, self.window, self.n_mels).astype(np.float32)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.invstd = np.asarray(invstd, dtype=np.float32)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        n = self.config.num_frames(samples.shape[0])
        if n == 0:
            return np.zeros((0, self.n_mels), np.float32)
        idx = np.arange(self.window)[None, :] + self.hop * np.arange(n)[:, None]
        spectrum = np.abs(np.fft.rfft(np.asarray(samples, np.float32)[idx] * self.hann, axis=1)) ** 2  # complex64
        mel = (spectrum @ self.fbank) * np.float32(LOG_GAIN)
        log = np.where(mel > math.e, np.log(np.maximum(mel, np.float32(math.e))), mel / np.float32(math.e))
        return (log.astype(np.float32) - self.mean) * self.invstd


def _session(path: Path, threads: int):
    return open_session(path, threads, default_spinning(), path.stem)


class LiteRecognizer:
    """One stream at a time: :meth:`accept_audio` pieces, :meth:`finish`, :attr:`text`; or
    :meth:`transcribe` a whole utterance. Built by :func:`load` (``trial``: the bundle's resolved
    :class:`dse.core.config.TrialConfig`, geometry as built)."""

    def __init__(self, directory: Path, config: dict, features: dict, vocabulary: dict, trial,
                 threads: Optional[int] = None, lm=None):
        art = config["encoder_artifact"]
        self.threads = int(threads or trial.threads)
        self.logmel = LogMel(FeatureConfig(**features["config"]), features["mean"], features["invstd"])
        self.sample_rate = self.logmel.sample_rate
        self.segment, self.right = trial.segment_frames, trial.right_context_frames
        self.chunk_frames, _ = chunk_geometry(self.segment, self.right)
        self._chunk_length = np.array([self.chunk_frames], np.int64)
        self.encoder = _session(directory / art["file"], self.threads)
        decoder = [directory / art["decoder"][name]["file"] for name in ("predictor", "joiner")]
        threads = decoder_threads(*decoder, self.threads)
        predictor, joiner = (_session(path, threads) for path in decoder)
        self.tokenizer = vocab.from_dict(vocabulary)  # needs_torch refused the other kinds
        self.symbols = getattr(self.tokenizer, "symbols", None)
        self.blank = self.tokenizer.blank
        self.beam_width = trial.beam_width
        rows = LMRows(lm, self.symbols, self.blank, trial.lm_weight) if lm is not None else None
        self.search = search_for(predictor, joiner, self.blank, self.beam_width, trial.temperature, rows)
        try:
            self.layout = encoder_layout(self.encoder, directory / art["file"])
        except BackendError as exc:
            raise LiteError(f"{directory}: {exc}") from None
        if self.layout["memory"]:
            raise LiteError(f"{directory}: an encoder with memory slots needs the torch runtime")
        self.reset()

    # -- the stream ------------------------------------------------------------------------
    def reset(self) -> None:
        lay = self.layout
        zeros = np.zeros((lay["left_context"], lay["dim"]), np.float32)  # never written to: shared
        self._enc = dict.fromkeys(lay["state"][1:], zeros)
        self._enc["past_length"] = np.zeros((lay["layers"], 1, 1), np.int32)
        self._buffer = np.zeros(0, np.float32)
        self._pending = np.zeros((0, self.logmel.n_mels), np.float32)
        self.samples_in = 0
        self._hyp = None  # the search's hypothesis (greedy) or beam state; None until the first chunk

    def accept_audio(self, samples: np.ndarray) -> None:
        """Feed float samples ``(n,)``; decode every chunk they complete."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples_in += samples.shape[0]
        self._buffer = np.concatenate([self._buffer, samples])
        n = self.logmel.config.num_frames(self._buffer.shape[0])
        if n:
            frames = self.logmel(self._buffer[: self.logmel.config.samples_for_frames(n)])
            self._buffer = self._buffer[n * self.logmel.hop:]
            self._pending = np.concatenate([self._pending, frames])
        while self._pending.shape[0] >= self.chunk_frames:
            self._decode_chunk(self._pending[: self.chunk_frames])
            self._pending = self._pending[self.segment:]

    def finish(self) -> None:
        """Pad with silence until every frame that holds audio has been decoded in a segment."""
        pad = flush_padding_samples(self.samples_in, self.logmel.config, self.segment, self.right)
        if pad:
            self.accept_audio(np.zeros(pad, np.float32))
            self.samples_in -= pad

    def transcribe(self, samples: np.ndarray) -> str:
        self.reset()
        piece = self.segment * self.logmel.hop
        for i in range(0, len(samples), piece):
            self.accept_audio(samples[i: i + piece])
        self.finish()
        return self.text

    @property
    def tokens(self) -> List[int]:
        """The best hypothesis, blank-led, as torchaudio keeps it (empty before the first chunk)."""
        if self._hyp is None:
            return []
        return self.search.best_tokens(self._hyp)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens[1:])

    # -- one chunk -----------------------------------------------------------------------------
    def _decode_chunk(self, chunk: np.ndarray) -> None:
        feeds = dict(self._enc, input=chunk[None], lengths=self._chunk_length)  # features are float32
        out, _, *state = self.encoder.run(self.layout["outputs"], feeds)
        self._enc = dict(zip(self.layout["state"], state))
        self._hyp = self.search.advance(self._hyp, out, self.beam_width)


def load(directory, threads: Optional[int] = None) -> LiteRecognizer:
    """The bundle at ``directory`` as a :class:`LiteRecognizer`, after checking every file it reads
    against ``MANIFEST.sha256``; :class:`LiteError` says why a bundle needs the torch runtime."""
    directory = Path(directory)
    try:
        manifest = bundle.read_manifest(directory)
    except (OSError, DSEError) as exc:
        raise LiteError(f"{directory}: no readable MANIFEST.sha256 ({exc}); not a dse bundle") from None

    def read(name: str) -> Path:  # only the files this runtime reads are hashed (not weights.pt)
        try:
            return bundle.check_listed(directory, manifest, name)
        except DSEError as exc:
            if name not in manifest:
                raise LiteError(str(exc)) from None
            raise LiteError(f"{directory / name}: missing, or its sha256 does not match {bundle.MANIFEST_FILE}; "
                            "export the bundle again") from None

    try:
        return _load(directory, read, threads)
    except (KeyError, TypeError, ValueError) as exc:  # a config or features file without what it should hold
        raise LiteError(f"{directory}: incomplete or altered bundle ({type(exc).__name__}: {exc}); export it "
                        "again") from None


def needs_torch(config: dict, trial, vocabulary: dict) -> List[str]:
    """Why a bundle (its ``config.json``, resolved trial configuration and ``vocabulary.json``) needs
    the torch runtime; empty when this one runs it. The export's README says what this says."""
    art = config.get("encoder_artifact") or {}
    why = []
    if trial.backend != "onnxruntime" or art.get("kind") != "onnx" or not art.get("decoder"):
        why.append("its encoder, predictor and joiner are not all ONNX files (export a trial with backend "
                   "onnxruntime)")
    if art.get("memory"):
        why.append("an encoder with memory slots")
    if vocabulary.get("kind") not in vocab.KINDS:
        why.append(f"a {vocabulary.get('kind')} vocabulary")
    if trial.lm_weight > 0 and (not config.get("language_model") or vocabulary.get("kind") != "chars"):
        why.append("language-model fusion without a character vocabulary and the LM file")
    return why


def _load(directory: Path, read, threads: Optional[int]) -> LiteRecognizer:
    config = json.loads(read(bundle.CONFIG_FILE).read_text())
    bundle.check_format(config, directory / bundle.CONFIG_FILE)
    trial = bundle.trial_config(directory, config)  # refuses a newer dse's configuration
    art = config.get("encoder_artifact") or {}
    vocabulary = json.loads(read(bundle.VOCABULARY_FILE).read_text())
    lm_entry = config.get("language_model") if trial.lm_weight > 0 else None
    why = needs_torch(config, trial, vocabulary)
    if why:
        raise LiteError(f"{directory}: needs the torch runtime (dse.deploy.runtime.load): " + "; ".join(why))
    for name in (art["file"], art["decoder"]["predictor"]["file"], art["decoder"]["joiner"]["file"]):
        read(name)
    lm = None
    if lm_entry:
        try:
            lm = CharNgramLM.load(read(lm_entry["file"]))
        except DSEError as exc:
            raise LiteError(f"{directory}: {exc}") from None
    features = json.loads(read(bundle.FEATURES_FILE).read_text())
    return LiteRecognizer(directory, config, features, vocabulary, trial, threads=threads, lm=lm)

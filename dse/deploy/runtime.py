"""Serve an exported bundle: ``load(DIR)`` returns a ready :class:`~dse.core.stream.StreamingRecognizer`.

A bundle (written by ``python -m dse.export``) is a directory::

    config.json       format and version, trial configuration, architecture, MoE edits, files
    weights.pt        the deployed model's state dict (bf16/fp16 tensors, or int8 packed params)
    features.json     front-end geometry (samples at the sample rate) and normalisation stats (n_mels,)
    vocabulary.json   the tokenizer (``vocabulary.model`` beside it for sentencepiece)
    lm.lm.gz          only when the trial fused a character language model (lm_weight > 0)
    metrics.json      what the study measured, with the machine it measured on and each eval
                      utterance's word errors (utterance_errors: [errors, reference words])
    encoder.ts        optional: the streaming encoder alone, as TorchScript (or encoder.pt2 from
                      torch.export); config.json "encoder_artifact" says which, or why neither
    encoder.onnx      for a trial with backend onnxruntime: the encoder it ran (fp32, or int8 from
                      ONNX Runtime's dynamic quantisation), which the runtime streams with ONNX
                      Runtime; its SHA-256 is in config.json "encoder_artifact" and the manifest
    predictor.onnx, joiner.onnx
                      the same for the predictor step and the joiner (encoder_artifact "decoder");
                      a bundle exported before they ran in ONNX Runtime has none and runs them in torch
    README.md
    MANIFEST.sha256   ``sha256sum`` lines for every other file

This module is the deployment side: it imports torch, torchaudio and the few dse
modules that build and stream a model (and onnxruntime, for an ONNX encoder), never the
study machinery (Optuna, jiwer, the dashboard). :func:`load` checks the manifest first, so a missing or altered file
is refused by name before anything is unpickled.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from dse.core import build, models
from dse.core.config import TrialConfig
from dse.core.errors import ConfigError
from dse.core.features import FeatureConfig, LogMel
from dse.core.precision import apply_precision
from dse.core.stream import ChunkEvent, StreamingRecognizer
# the bundle's files and checks (torch-free), under the names this module has always offered
from dse.deploy.bundle import (BUNDLE_FORMAT, BUNDLE_VERSION, CONFIG_FILE, FEATURES_FILE, LM_FILE,  # noqa: F401
                               MANIFEST_FILE, METRICS_FILE, README_FILE, REQUIRED_FILES, VOCABULARY_FILE,
                               WEIGHTS_FILE, BundleError, read_config, read_json, read_manifest, sha256_file,
                               trial_config, verify_manifest, write_manifest)

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "BundleError", "load", "read_config", "read_json", "live_pieces", "piece_samples",
           "stream"]
_PACKED = "._packed_params._packed_params"


# -- model ----------------------------------------------------------------------------------
def _tokenizer(directory: Path, vocab: dict):
    if vocab.get("kind") == "sentencepiece":  # the model file travels inside the bundle
        vocab = dict(vocab, model_path=str(directory / vocab["model_file"]))
    try:
        return models.tokenizer_from_dict(vocab, where=str(directory / VOCABULARY_FILE))
    except models.ModelLoadError as exc:
        raise BundleError(str(exc)) from None


def _fp32_state(state: dict) -> dict:
    """``state`` with every float tensor in fp32 and int8 packed Linear weights dequantised."""
    out = {}
    packed = {k[: -len(_PACKED)] for k in state if k.endswith(_PACKED)}
    for key, value in state.items():
        if key.endswith(_PACKED):
            prefix = key[: -len(_PACKED)]
            weight, bias = value
            out[f"{prefix}.weight"] = weight.dequantize()
            if bias is not None:
                out[f"{prefix}.bias"] = bias.float()
            continue
        owner = key.rsplit(".", 1)[0]
        if owner in packed or (owner.endswith("._packed_params") and owner[: -len("._packed_params")] in packed):
            continue  # scale, zero_point and dtype of a quantised Linear
        out[key] = value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    return out


def _load_model(directory: Path, config: dict, trial: TrialConfig, fp32_reference: bool) -> torch.nn.Module:
    path = directory / WEIGHTS_FILE
    try:
        with warnings.catch_warnings():  # int8 packed params warn about TypedStorage
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable state dict ({type(exc).__name__}: {exc})") from exc
    try:
        model = build.module_for(config["architecture"], config["num_symbols"], config.get("moe"))
    except ConfigError as exc:
        raise BundleError(f"{exc}; the bundle is inconsistent, export it again") from None
    if fp32_reference:
        state = _fp32_state(state)
    else:  # the module structure the weights were saved from: the study's own precision transform
        model = apply_precision(model, trial.precision, in_place=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BundleError(f"{path}: weights do not fit the architecture in config.json ({str(exc)[:400]})") from exc
    return model.eval()


def load(directory: str | os.PathLike, *, compile: Optional[bool] = None,
         fp32_reference: bool = False, lm_weight: Optional[float] = None,
         temperature: Optional[float] = None, threads: Optional[int] = None) -> StreamingRecognizer:
    """Rebuild the bundle's streaming recognizer.

    ``compile``: wrap the encoder's per-chunk ``infer`` in ``torch.compile`` with the
    trial's mode (``None``: as the trial was measured; the first chunks then pay the
    compile time; a torch encoder only). ``fp32_reference``: the same architecture and
    decoder with the weights in fp32 (int8 weights dequantised) and a torch encoder, a
    same-run timing reference. ``lm_weight``: the language-model fusion weight (``None``:
    the trial's; 0: no LM). ``temperature``: the decoder temperature (``None``: the trial's;
    1.0 for bundles exported before the knob existed, which is what they were measured with).
    ``threads``: intra-op threads (``None``: the trial's): an ONNX Runtime encoder's session
    gets them when it is made, and the recognizer sets torch's whenever it decodes (1 beside
    an ONNX Runtime encoder, :func:`dse.core.build.torch_threads`).
    """
    directory = Path(directory)
    config = read_config(directory)
    try:
        return _recognizer(directory, config, compile, fp32_reference, lm_weight, temperature, threads)
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{directory}: config.json, features.json or vocabulary.json lacks or mistypes a "
                          f"field ({type(exc).__name__}: {exc}); export the bundle again") from exc


def _onnx_encoder(directory: Path, config: dict, model: torch.nn.Module, threads: int) -> torch.nn.Module:
    """``model`` with the bundle's ONNX encoder (and predictor and joiner) in ONNX Runtime, after checking
    that the manifest lists each file with the SHA-256 config.json records. :func:`read_config` has
    already checked every listed file against the manifest, so no file is hashed again here."""
    art = config.get("encoder_artifact") or {}
    if art.get("kind") != "onnx" or not art.get("file") or not art.get("sha256"):
        raise BundleError(f"{directory / CONFIG_FILE}: the trial ran its encoder with onnxruntime but "
                          "encoder_artifact names no ONNX file with its sha256; export the bundle again")
    listed = read_manifest(directory)

    def checked(entry: dict) -> Path:
        if not entry.get("file") or not entry.get("sha256"):
            raise BundleError(f"{directory / CONFIG_FILE}: encoder_artifact names an ONNX file without its sha256; "
                              "export the bundle again")
        path = directory / entry["file"]
        if entry["file"] not in listed or "/" in entry["file"]:
            raise BundleError(f"{directory / MANIFEST_FILE}: does not list {entry['file']}; the bundle is incomplete, "
                              "export it again")
        actual = listed[entry["file"]]  # the file's own digest: the manifest was verified on reading the config
        if actual != entry["sha256"]:
            raise BundleError(f"{path}: sha256 {actual[:16]}... does not match config.json ({entry['sha256'][:16]}...); "
                              "the file was altered or replaced, export again")
        return path

    path = checked(art)
    decoder = art.get("decoder")  # bundles exported before the decoder ran in ONNX Runtime have none
    decoder_paths = {name: checked(decoder[name]) for name in ("predictor", "joiner")} if decoder else None
    from dse.core import onnx_decoder, onnx_encoder

    try:
        model = onnx_encoder.use_onnx_encoder(model, path, threads=threads, spinning=onnx_encoder.default_spinning())
        if decoder_paths:
            model = onnx_decoder.use_onnx_decoder(model, decoder_paths["predictor"], decoder_paths["joiner"],
                                                  threads=threads, spinning=onnx_encoder.default_spinning())
        return model
    except onnx_encoder.BackendError as exc:
        raise BundleError(f"{directory}: this bundle runs its encoder with ONNX Runtime: {exc}") from None


def _recognizer(directory: Path, config: dict, compile: Optional[bool], fp32_reference: bool,
                lm_weight: Optional[float] = None, temperature: Optional[float] = None,
                threads: Optional[int] = None) -> StreamingRecognizer:
    feats = read_json(directory, FEATURES_FILE)
    vocab = read_json(directory, VOCABULARY_FILE)
    tokenizer = _tokenizer(directory, vocab)
    if tokenizer.num_symbols != config["num_symbols"]:
        raise BundleError(f"{directory / VOCABULARY_FILE}: {tokenizer.num_symbols} symbols, config.json "
                          f"records {config['num_symbols']}; the bundle is inconsistent, export it again")
    logmel = LogMel(FeatureConfig(**feats["config"]), torch.tensor(feats["mean"]), torch.tensor(feats["invstd"]))
    trial = trial_config(directory, config)
    model = _load_model(directory, config, trial, fp32_reference)
    changes = {}
    if fp32_reference:
        changes.update(precision="fp32", backend="torch")
    elif trial.backend == "onnxruntime":
        if compile:
            raise BundleError(f"{directory}: the encoder of this bundle runs in ONNX Runtime; compile applies to a "
                              "torch encoder only (load it with compile=None or False)")
        model = _onnx_encoder(directory, config, model, threads or trial.threads)
    if compile is not None and changes.get("backend", trial.backend) == "torch":
        changes["compile"] = (trial.compile if trial.compile != "off" else "default") if compile else "off"
    if threads is not None:
        changes["threads"] = int(threads)
    if lm_weight is not None:
        changes["lm_weight"] = float(lm_weight)
    if temperature is not None:
        changes["temperature"] = float(temperature)
    trial = trial.replace(**changes)
    model = build.apply_compile(model, trial)
    lm = None
    if trial.lm_weight > 0:
        from dse.core.lm import CharNgramLM

        entry = config.get("language_model")
        if not entry:
            raise BundleError(f"{directory}: the trial fused no language model, so the bundle holds none "
                              f"(asked for lm_weight={trial.lm_weight:g})")
        lm = CharNgramLM.load(directory / entry["file"])
    return build.assemble(model, logmel, tokenizer, trial, lm=lm)


# -- streaming ------------------------------------------------------------------------------
def piece_samples(recognizer: StreamingRecognizer) -> tuple[int, int]:
    """(first piece, later pieces) in samples: ``StreamingRecognizer.piece_samples``."""
    return recognizer.piece_samples()


def live_pieces(num_samples: int, recognizer: StreamingRecognizer) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges a live stream of ``num_samples`` samples delivers (:func:`piece_samples`).

    This is the schedule :mod:`dse.core.measure` times, so a bundle streamed this way gives
    the transcripts its study measured.
    """
    return recognizer.arrival_pieces(num_samples)


def stream(recognizer: StreamingRecognizer, waveform: torch.Tensor,
           on_chunk: Optional[Callable[[ChunkEvent], None]] = None) -> str:
    """Stream ``waveform`` ``(samples,)`` (float, the bundle's sample rate) as it would arrive live.

    ``on_chunk(event)`` is called after every decoded chunk (partial text:
    ``recognizer.text``). Returns the final transcript.
    """
    recognizer.reset()
    for start, end in live_pieces(waveform.numel(), recognizer):
        for event in recognizer.accept_audio(waveform[start:end]):
            if on_chunk:
                on_chunk(event)
    for event in recognizer.finish():
        if on_chunk:
            on_chunk(event)
    return recognizer.text

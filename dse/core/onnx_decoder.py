"""ONNX Runtime backend for the RNN-T decoder's networks: the predictor step and the joiner.

With ``backend=onnxruntime`` the encoder runs in ONNX Runtime (:mod:`dse.core.onnx_encoder`)
and so do the two networks the search calls for every hypothesis and step. torchaudio's
search calls them through the model's ``predict`` and ``join`` (:class:`OrtPredictor`,
:class:`OrtJoiner`); :class:`dse.core.decoder.FastRNNTSearch` runs its search on their
sessions in numpy instead (:mod:`dse.core.ort_search`). Measured on the base model at
int8 (one hypothesis, hot cache, 1 thread): predictor step 0.17 ms in ONNX Runtime against
0.51 ms for torch's dynamically quantised one, joiner 0.07 ms against 0.10 ms (a one-off probe, not a benchmark in this repository).

Graphs (``B`` hypotheses, ``L`` LSTM layers, ``H`` their width, ``E`` the joiner's input
width, ``V`` the vocabulary with the blank)::

    predictor.onnx  tokens (B, 1) int64, h (L, B, H), c (L, B, H)
                    -> output (B, 1, E), next_h (L, B, H), next_c (L, B, H)
    joiner.onnx     source (B, T, E), target (B, U, E) -> logits (B, T, U, V)

``B``, ``T`` and ``U`` are dynamic. torchaudio's predictor state (a list over layers of
``[h (B, H), c (B, H)]``) is converted both ways by :class:`OrtPredictor`. int8 is
``onnxruntime.quantization.quantize_dynamic`` of the fp32 export, as for the encoder. The
sessions get the encoder's spinning, and its threads unless the decoder is small
(:func:`dse.core.ort_session.decoder_threads`). Hot, one thread is faster (a handful of rows
per product); in a stream the encoder has just pushed the decoder's weights out of the cache,
and two spinning threads read a large decoder's back faster: on the base model at int8 the
predictor's share of a chunk fell from 2.35 to 1.86 ms with 2 threads (a one-off probe), though
the whole stream was not measurably faster (``decoder_threads``' figures).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from dse.core.onnx_encoder import (PRECISIONS, BackendError, _quiet, _require, _summary,
                                   _write_json_atomic, default_cache_dir, open_session, quantize_graph)
from dse.core.ort_session import decoder_threads

FILES = ("predictor", "joiner")
FORMAT_VERSION = 1  # of the predictor and joiner graphs, in the export cache's key


class _PredictorStep(torch.nn.Module):
    def __init__(self, predictor):
        super().__init__()
        self.predictor = predictor
        self.layers = len(predictor.lstm_layers)

    def forward(self, tokens, h, c):
        lengths = torch.ones(tokens.shape[0], dtype=torch.int64)
        out, _, state = self.predictor(tokens, lengths, [[h[i], c[i]] for i in range(self.layers)])
        return out, torch.stack([s[0] for s in state]), torch.stack([s[1] for s in state])


class _JoinerStep(torch.nn.Module):
    def __init__(self, joiner):
        super().__init__()
        self.joiner = joiner

    def forward(self, source, target):
        lengths = torch.ones(source.shape[0], dtype=torch.int32)
        return self.joiner(source, lengths, target, lengths)[0]


def _dims(model) -> dict:
    predictor = model.predictor
    return {"layers": len(predictor.lstm_layers), "hidden": predictor.lstm_layers[0].hidden_dim,
            "encoding": model.joiner.linear.in_features, "symbols": model.joiner.linear.out_features}


def export_decoder(model, directory) -> dict:
    """Export ``model``'s predictor step and joiner (float32) to ``directory``/predictor.onnx and
    joiner.onnx. Returns ``{"export_s", "bytes", "layers", "hidden", "encoding", "symbols"}``."""
    _require("onnxscript")
    directory = Path(directory)
    dims = _dims(model)
    if next(model.predictor.parameters()).dtype != torch.float32:
        raise BackendError("the ONNX decoder is exported from a float32 model")
    batch = torch.export.Dim("hypotheses", min=1, max=1024)
    steps = {"T": torch.export.Dim("frames", min=1, max=4096), "U": torch.export.Dim("targets", min=1, max=4096)}
    tokens = torch.tensor([[1], [2]])
    h = torch.zeros(dims["layers"], 2, dims["hidden"])
    enc = torch.zeros(2, 1, dims["encoding"])
    start = time.perf_counter()
    total = 0
    was_training = model.training
    model.eval()
    try:
        for name, module, example, inputs, outputs, dynamic in (
                ("predictor", _PredictorStep(model.predictor), (tokens, h, h.clone()), ["tokens", "h", "c"],
                 ["output", "next_h", "next_c"], {"tokens": {0: batch}, "h": {1: batch}, "c": {1: batch}}),
                ("joiner", _JoinerStep(model.joiner), (enc, enc.clone()), ["source", "target"], ["logits"],
                 {"source": {0: batch, 1: steps["T"]}, "target": {0: batch, 1: steps["U"]}})):
            path = directory / f"{name}.onnx"
            try:
                with torch.no_grad(), _quiet():
                    program = torch.onnx.export(module, example, dynamo=True, input_names=inputs,
                                                output_names=outputs, dynamic_shapes=dynamic, external_data=False)
                    program.save(str(path), external_data=False)
            except Exception as exc:
                path.unlink(missing_ok=True)
                raise BackendError(f"ONNX export of the {name} failed: {_summary(exc)}") from exc
            total += path.stat().st_size
    finally:
        model.train(was_training)
    return dict(dims, export_s=time.perf_counter() - start, bytes=total)


def decoder_onnx(model, precision: str = "fp32", cache_dir=None, key: str = "") -> Tuple[dict, dict]:
    """The predictor step and joiner as ONNX files (``{"predictor": path, "joiner": path}``), exported
    (and quantised) once per ``key``, which must identify the decoder's weights (the cache trusts it).
    Returns ``(paths, info)``; ``info["hit"]``: from the cache; ``export_s``/``quantize_s``: seconds
    spent in this call."""
    if precision not in PRECISIONS:
        raise BackendError(f"ONNX decoder precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not key:
        raise BackendError("decoder_onnx needs a non-empty cache key identifying the decoder's weights")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(f"{FORMAT_VERSION}:{key}:{torch.__version__}:{_require('onnxruntime').__version__}"
                            .encode()).hexdigest()[:24]
    folder = cache_dir / f"decoder-{digest}"
    paths = {name: folder / f"{name}.{precision}.onnx" for name in FILES}
    meta = folder / f"decoder.{precision}.json"
    if all(p.is_file() for p in paths.values()) and meta.is_file():
        try:
            return paths, dict(json.loads(meta.read_text()), hit=True, export_s=0.0, quantize_s=0.0)
        except (OSError, ValueError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))  # renamed into place when complete
    try:
        info = export_decoder(model, staging)
        info.update(quantize_s=0.0, precision=precision)
        if precision == "int8":
            for name in FILES:
                src, dst = staging / f"{name}.onnx", staging / f"{name}.int8.onnx"
                info["quantize_s"] += quantize_graph(src, dst)["quantize_s"]
                os.replace(dst, src)
        for name in FILES:
            os.replace(staging / f"{name}.onnx", paths[name])
    finally:
        for leftover in staging.glob("*"):
            leftover.unlink(missing_ok=True)
        staging.rmdir()
    info["bytes"] = sum(p.stat().st_size for p in paths.values())
    _write_json_atomic(meta, info)
    return paths, dict(info, hit=False)


class OrtPredictor(torch.nn.Module):
    """``predictor.onnx`` in an ONNX Runtime session, with torchaudio's ``_Predictor.forward`` signature
    (one step: ``input`` ``(B, 1)``). Shared, not copied, by ``copy.deepcopy``; no parameters."""

    def __init__(self, path, threads: int = 1, spinning: bool = False):
        super().__init__()
        self.path = Path(path)
        self.threads = int(threads)
        self.session = open_session(self.path, threads, spinning, "predictor")
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        if set(shapes) != {"tokens", "h", "c"}:
            raise BackendError(f"{self.path} is not a predictor exported by dse (inputs {', '.join(shapes)})")
        self.layers, _, self.hidden = shapes["h"]

    def __deepcopy__(self, memo) -> "OrtPredictor":
        return self

    def forward(self, input: torch.Tensor, lengths: torch.Tensor,
                state: Optional[List[List[torch.Tensor]]] = None) -> Tuple[torch.Tensor, torch.Tensor, List[List[torch.Tensor]]]:
        if input.dim() != 2 or input.shape[1] != 1:
            raise BackendError(f"the ONNX predictor takes one token per hypothesis, (B, 1); got {tuple(input.shape)}")
        n = input.shape[0]
        if state is None:
            h = c = np.zeros((self.layers, n, self.hidden), np.float32)
        else:
            h = torch.stack([s[0] for s in state]).float().numpy()
            c = torch.stack([s[1] for s in state]).float().numpy()
        out, next_h, next_c = self.session.run(None, {"tokens": input.to(torch.int64).numpy(), "h": h, "c": c})
        next_h, next_c = torch.from_numpy(next_h), torch.from_numpy(next_c)
        return torch.from_numpy(out), lengths, [[next_h[i], next_c[i]] for i in range(self.layers)]

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


class OrtJoiner(torch.nn.Module):
    """``joiner.onnx`` in an ONNX Runtime session, with torchaudio's ``_Joiner.forward`` signature."""

    def __init__(self, path, threads: int = 1, spinning: bool = False):
        super().__init__()
        self.path = Path(path)
        self.threads = int(threads)
        self.session = open_session(self.path, threads, spinning, "joiner")
        names = [i.name for i in self.session.get_inputs()]
        if names != ["source", "target"]:
            raise BackendError(f"{self.path} is not a joiner exported by dse (inputs {', '.join(names)})")

    def __deepcopy__(self, memo) -> "OrtJoiner":
        return self

    def forward(self, source_encodings: torch.Tensor, source_lengths: torch.Tensor, target_encodings: torch.Tensor,
                target_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (logits,) = self.session.run(None, {"source": source_encodings.float().contiguous().numpy(),
                                            "target": target_encodings.float().contiguous().numpy()})
        return torch.from_numpy(logits), source_lengths, target_lengths

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


def use_onnx_decoder(model, predictor_path, joiner_path, threads: int = 1, spinning: bool = False):
    """A shallow copy of the RNNT ``model`` whose predictor and joiner run in ONNX Runtime (the
    original is not modified; its transcriber is shared). ``threads`` and ``spinning`` as for the
    encoder's session (:class:`dse.core.onnx_encoder.OrtTranscriber`), except that a small decoder
    runs on one thread (:func:`dse.core.ort_session.decoder_threads`); spinning stops when a call ends."""
    threads = decoder_threads(predictor_path, joiner_path, threads)
    ort_model = copy.copy(model)
    ort_model._modules = dict(model._modules)
    ort_model.predictor = OrtPredictor(predictor_path, threads, spinning)
    ort_model.joiner = OrtJoiner(joiner_path, threads, spinning)
    return ort_model

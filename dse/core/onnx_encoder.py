"""ONNX Runtime backend for the streaming Emformer encoder (the transcriber's per-chunk ``infer``).

The exported graph is ``model.transcriber.infer`` for one chunk at batch 1, with the
Emformer state flattened into a handful of named tensors (``L`` Emformer layers, ``Lc``
left-context frames and ``M`` memory slots after time reduction, ``D`` the Emformer
width, ``F`` = ``chunk_frames`` = (segment + right context) feature frames, ``N`` mel bins,
``S`` = segment length after time reduction, ``E`` the encoding dim)::

    inputs   input            (1, F, N)    float32  log-mel features (+ right context)
             lengths          (1,)         int64    valid frames in ``input``
             past_length      (L, 1, 1)    int32    frames (after time reduction) seen so far
             lc_key_0 ... lc_key_{L-1}  (Lc, D) float32  each layer's left-context keys
             lc_val_0 ... lc_val_{L-1}  (Lc, D) float32  each layer's left-context values
             memory_0 ... memory_{L-1}  (M, D)  float32  only when the model has memory (M > 0)
    outputs  output           (1, S, E)    float32  encoder frames for the joiner
             output_lengths   (1,)         int64
             next_past_length, next_lc_key_i, next_lc_val_i[, next_memory_i]: the next chunk's state

(:func:`state_names` lists the state in this order.) Each layer's state is a tensor of its own: a
stacked layout cost the base model's int8 graph 126 of its 1,101 nodes (unstacking, stacking)
and 7 % of a chunk (8.46 against 7.87 ms, a one-off probe with the nodes cut out of the graph).

torchaudio's state layout (what :class:`RNNTBeamSearch` carries between chunks) is a
list over layers of ``[memory (M, 1, D), lc_key (Lc, 1, D), lc_val (Lc, 1, D),
past_length (1, 1) int32]``; :class:`OrtTranscriber` converts both ways, so an
ORT-backed model (:func:`use_onnx_encoder`) is a drop-in for the torch one.

Exporting uses ``torch.onnx.export(..., dynamo=True)``: the TorchScript exporter
(``dynamo=False``) writes a graph ONNX Runtime refuses (a Reshape with a zero-size
dimension). int8 is ``onnxruntime.quantization.quantize_dynamic`` (weights QInt8,
activations quantised per call). :func:`encoder_onnx` caches both by a caller-given
content key under ``$DSE_ONNX_CACHE`` (default ``~/.cache/dse/onnx``).

Files are single ``.onnx`` files (weights inside), so models above ONNX's 2 GB
protobuf limit are not supported; the base model's encoder is 243 MiB at fp32 (``benchmarks/stream_base.py``
prints it).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from dse.core.ort_session import (BackendError, _require, _summary, default_spinning, encoder_layout,  # noqa: F401
                                   open_session, state_names)
from dse.core.static_step import StaticInfer

STATE_SLOTS = ("memory", "lc_key", "lc_val", "past_length")  # torchaudio's per-layer order
FORMAT_VERSION = 4  # 2: the static-shape graph (StaticInfer); 3: its rows in time order, the next state
# sliced once; 4: a tensor per layer for the state
PRECISIONS = ("fp32", "int8")


# -- torchaudio's private state constructor, behind one function ------------------------------
def zero_state(transcriber) -> List[List[torch.Tensor]]:
    """The Emformer's initial (zero) state at batch 1, in torchaudio's layout.

    Per layer ``[memory (M, 1, D), lc_key (Lc, 1, D), lc_val (Lc, 1, D), past_length (1, 1) int32]``,
    from the private ``_EmformerLayer._init_state`` (the one place this module touches it).
    """
    return [layer._init_state(1, None) for layer in transcriber.transformer.emformer_layers]


def _geometry(transcriber) -> dict:
    """Sizes the graph is built for: layers, left context, memory, width, chunk frames, mel bins."""
    emformer = transcriber.transformer
    stride = transcriber.time_reduction.stride
    return {
        "layers": len(emformer.emformer_layers),
        "left_context": emformer.left_context_length,
        "memory": emformer.max_memory_size,
        "dim": emformer.emformer_layers[0].input_dim,
        "chunk_frames": (emformer.segment_length + emformer.right_context_length) * stride,
        "n_mels": transcriber.input_linear.in_features,
    }


class _FlatInfer(torch.nn.Module):
    """``transcriber.infer`` with the state as flat tensors, :func:`state_names`' order."""

    def __init__(self, transcriber, use_memory: bool):
        super().__init__()
        self.transcriber = transcriber
        self.use_memory = use_memory
        geo = _geometry(transcriber)
        self.num_layers, self.dim = geo["layers"], geo["dim"]

    def forward(self, input, lengths, past_length, *state):
        L = self.num_layers
        states = []
        for i in range(L):
            mem = state[2 * L + i].unsqueeze(1) if self.use_memory else input.new_zeros((0, 1, self.dim))
            states.append([mem, state[i].unsqueeze(1), state[L + i].unsqueeze(1), past_length[i]])
        output, output_lengths, new = self.transcriber.infer(input, lengths, states)
        slots = (1, 2) + ((0,) if self.use_memory else ())
        return (output, output_lengths, torch.stack([s[3] for s in new]),
                *(s[j].squeeze(1) for j in slots for s in new))


def _flatten(states: List[List[torch.Tensor]], use_memory: bool) -> tuple:
    """torchaudio's per-layer state -> its flat tensors in :func:`state_names`' order."""
    slots = (1, 2) + ((0,) if use_memory else ())
    return (torch.stack([s[3] for s in states]), *(s[j].squeeze(1) for j in slots for s in states))


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, warnings and log lines (errors still raise)."""
    # The root logger too: onnxruntime's quantiser warns through logging.warning().
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_encoder(model, chunk_frames: int, path) -> dict:
    """Export ``model.transcriber.infer`` for one chunk ``(1, chunk_frames, n_mels)`` to ``path``.

    The model must be float32 (export a bf16/fp16 model's float32 original instead) and
    is put in eval mode for the export. Returns ``{"export_s", "bytes", "opset",
    "inputs", "outputs", "chunk_frames", "layers", "left_context", "memory", "dim",
    "n_mels", "graph", "nodes"}`` (``graph``: ``"static"`` for :class:`StaticInfer`, else
    ``"torchaudio"``; ``nodes``: top-level nodes of the exported graph). Raises :class:`BackendError` with the exporter's reason when the model
    cannot be exported (e.g. an operator or data-dependent control flow it cannot trace).
    """
    path = Path(path)
    transcriber = model.transcriber
    geo = _geometry(transcriber)
    if chunk_frames != geo["chunk_frames"]:
        raise BackendError(f"chunk_frames={chunk_frames}, but this encoder takes chunks of exactly "
                           f"{geo['chunk_frames']} feature frames (segment + right context)")
    dtype = next(transcriber.parameters()).dtype
    if dtype != torch.float32:
        raise BackendError(f"the ONNX encoder is exported from a float32 model; this one is {dtype}")
    use_memory = geo["memory"] > 0
    graph = "static" if StaticInfer.supports(transcriber) else "torchaudio"
    names = state_names(geo["layers"], use_memory)
    in_names = ["input", "lengths"] + names
    out_names = ["output", "output_lengths"] + [f"next_{n}" for n in names]
    was_training = transcriber.training
    transcriber.eval()
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(1, chunk_frames, geo["n_mels"], generator=gen), torch.tensor([chunk_frames]),
               *_flatten(zero_state(transcriber), use_memory))
    path.parent.mkdir(parents=True, exist_ok=True)
    _require("onnxscript")  # the dynamo exporter's dependency; a clear error instead of a deep one
    start = time.perf_counter()
    try:
        with torch.no_grad(), _quiet():
            module = StaticInfer(transcriber) if graph == "static" else _FlatInfer(transcriber, use_memory)
            program = torch.onnx.export(module, example, dynamo=True,
                                        input_names=in_names, output_names=out_names, external_data=False)
            program.save(str(path), external_data=False)
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise BackendError(f"ONNX export of the encoder failed: {_summary(exc)}") from exc
    finally:
        transcriber.train(was_training)
    seconds = time.perf_counter() - start
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return dict(geo, export_s=seconds, bytes=path.stat().st_size, opset=opset, inputs=in_names, outputs=out_names,
                graph=graph, nodes=len(program.model_proto.graph.node))


def _op_counts(path) -> Counter:
    onnx = _require("onnx")

    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node)
    for fn in model.functions:
        counts.update(node.op_type for node in fn.node)
    return counts


INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "DynamicQuantizeLSTM",
               "DynamicQuantizeMatMul", "QAttention", "QGemm", "DequantizeLinear", "QuantizeLinear")


def quantize_graph(fp32_path, int8_path) -> dict:
    """Dynamic int8 quantisation (weights QInt8, activations per call) of an exported graph (the
    encoder, the predictor, the joiner).

    Returns ``{"quantize_s", "bytes", "fp32_bytes", "quantized_ops": {op: count},
    "float_matmuls_left": int}``: ``quantized_ops`` counts the integer/quantisation nodes
    in the int8 graph (e.g. ``MatMulInteger``, ``DynamicQuantizeLinear``);
    ``float_matmuls_left`` the MatMul/Gemm nodes still in float (activation x activation
    products such as attention scores, which dynamic quantisation leaves alone).
    """
    quantization = _require("onnxruntime.quantization")

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if not fp32_path.is_file():
        raise BackendError(f"cannot quantise {fp32_path}: no such file")
    start = time.perf_counter()
    try:
        with _quiet():
            quantization.quantize_dynamic(str(fp32_path), str(int8_path),
                                          weight_type=quantization.QuantType.QInt8)
    except Exception as exc:
        int8_path.unlink(missing_ok=True)
        raise BackendError(f"int8 quantisation of {fp32_path} failed: {_summary(exc)}") from exc
    seconds = time.perf_counter() - start
    counts = _op_counts(int8_path)
    return {"quantize_s": seconds, "bytes": int8_path.stat().st_size, "fp32_bytes": fp32_path.stat().st_size,
            "quantized_ops": {op: counts[op] for op in INTEGER_OPS if counts[op]},
            "float_matmuls_left": counts["MatMul"] + counts["Gemm"]}


# -- running ------------------------------------------------------------------------------------
class OrtTranscriber(torch.nn.Module):
    """An exported encoder in an ONNX Runtime session, with ``_Transcriber.infer``'s signature.

    ``threads``: ``intra_op_num_threads`` (inter-op is 1: the graph is one chain).
    ``spinning``: ``session.intra_op.allow_spinning``. A spinning worker busy-waits for the
    next op instead of sleeping: on a quiet machine that saves a wake-up per op (1.37x on the
    base int8 encoder at 2 threads, in a one-off probe), on a shared or oversubscribed one it steals the core another
    thread (or process) needs and can make a chunk ~30x slower (the OpenMP finding in
    DESIGN.md). The builds pass :func:`default_spinning` (off under ``OMP_WAIT_POLICY=PASSIVE``);
    the constructor's default is off.

    A subclass of ``torch.nn.Module`` only so that it can sit in an RNNT model's
    ``transcriber`` slot; it has no parameters and only supports streaming ``infer``.
    ``copy.deepcopy`` shares it (the session holds no stream state: that goes in and comes
    out of :meth:`infer`), so the precision transform can copy a model that holds one.
    ``export_info``: what the build recorded about the export (:func:`dse.core.build.apply_backend`).
    """

    export_info: Optional[dict] = None

    def __init__(self, path, threads: int = 1, spinning: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.path = Path(path)
        self.threads = int(threads)
        self.spinning = bool(spinning)
        self.dtype = dtype  # of the returned encoder frames (the joiner's dtype)
        self.session = open_session(self.path, self.threads, self.spinning, "encoder")
        layout = encoder_layout(self.session, self.path)
        self.chunk_frames, self.n_mels = layout["chunk_frames"], layout["n_mels"]
        self.num_layers, self.left_context, self.dim = layout["layers"], layout["left_context"], layout["dim"]
        self.memory_size = layout["memory"]
        self.use_memory = self.memory_size > 0
        self.state_names = layout["state"]
        self.output_names = layout["outputs"]

    def __deepcopy__(self, memo) -> "OrtTranscriber":
        return self

    def initial_state(self) -> List[List[torch.Tensor]]:
        """The zero state, as ``_EmformerLayer._init_state`` makes it (batch 1), from the graph's shapes."""
        def layer():
            return [torch.zeros(self.memory_size, 1, self.dim), torch.zeros(self.left_context, 1, self.dim),
                    torch.zeros(self.left_context, 1, self.dim), torch.zeros(1, 1, dtype=torch.int32)]

        return [layer() for _ in range(self.num_layers)]

    def forward(self, input, lengths):
        raise BackendError("the ONNX encoder runs streaming inference only (infer, one chunk at a time)")

    def infer(
        self,
        input: torch.Tensor,
        lengths: torch.Tensor,
        states: Optional[List[List[torch.Tensor]]],
    ) -> Tuple[torch.Tensor, torch.Tensor, List[List[torch.Tensor]]]:
        """One chunk: ``input`` ``(1, chunk_frames, n_mels)``, ``lengths`` ``(1,)``, ``states`` or None.

        Returns ``(output (1, S, E), output_lengths (1,), states)`` with ``states`` in
        torchaudio's list-of-lists layout (see the module docstring), as an :class:`OrtStates`
        that converts only when read.
        """
        if tuple(input.shape) != (1, self.chunk_frames, self.n_mels):
            raise BackendError(f"the ONNX encoder {self.path.name} takes input of shape "
                               f"(1, {self.chunk_frames}, {self.n_mels}), got {tuple(input.shape)}")
        feeds = {
            "input": input.detach().to(torch.float32).cpu().numpy(),
            "lengths": lengths.detach().to(torch.int64).cpu().numpy().reshape(1),
        }
        if isinstance(states, OrtStates) and states.owner is self and states.unchanged():
            feeds.update(states.arrays)  # the state this session returned: its arrays, not copies
        else:
            if states is None:
                states = self.initial_state()
            flat = _flatten([[s.detach().cpu() for s in layer] for layer in states], self.use_memory)
            feeds["past_length"] = flat[0].to(torch.int32).numpy()
            feeds.update((name, t.float().contiguous().numpy()) for name, t in zip(self.state_names[1:], flat[1:]))
        outs = self.session.run(self.output_names, feeds)
        arrays = dict(zip(self.state_names, outs[2:]))
        output = torch.from_numpy(outs[0])
        if output.dtype != self.dtype:
            output = output.to(self.dtype)
        return output, torch.from_numpy(outs[1]), OrtStates(self, arrays)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.threads}, spinning={self.spinning}"


class OrtStates(Sequence):
    """The state :meth:`OrtTranscriber.infer` returns: torchaudio's list over layers of ``[memory,
    lc_key, lc_val, past_length]``, built only when something reads it (a stream just hands it to the
    next chunk, which then feeds the session the arrays it returned, with no copies or conversions).

    Read, it is that list (views of the session's arrays); if a reader then replaces a slot (as
    torchaudio's ``infer`` does with the lists it is given), the next ``infer`` converts the slots."""

    __slots__ = ("owner", "arrays", "_layers", "_built")

    def __init__(self, owner: OrtTranscriber, arrays: dict):
        self.owner = owner
        self.arrays = arrays  # state_names -> array: the next chunk's feeds
        self._layers = None
        self._built = None

    def _read(self) -> List[List[torch.Tensor]]:
        if self._layers is None:
            a = {name: torch.from_numpy(v) for name, v in self.arrays.items()}
            past = a["past_length"]
            empty = torch.zeros(0, 1, a["lc_key_0"].shape[-1])

            def slot(name, i):
                return a[f"{name}_{i}"].unsqueeze(1) if f"{name}_{i}" in a else empty

            self._layers = [[slot("memory", i), slot("lc_key", i), slot("lc_val", i), past[i]]
                            for i in range(past.shape[0])]
            self._built = [tuple(layer) for layer in self._layers]
        return self._layers

    def unchanged(self) -> bool:
        """Whether the slots still hold the tensors built from :attr:`arrays` (always, if never read)."""
        return self._layers is None or (len(self._layers) == len(self._built) and all(
            len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(self._layers, self._built)))

    def __len__(self) -> int:
        return self.arrays["past_length"].shape[0]

    def __getitem__(self, i):
        return self._read()[i]

    def __repr__(self) -> str:
        return f"OrtStates({self._read()!r})"


def use_onnx_encoder(model, session_path, threads: int, spinning: bool = False):
    """A shallow copy of the RNNT ``model`` whose transcriber is an :class:`OrtTranscriber`.

    The predictor and joiner stay the original torch modules (shared, not copied), so
    ``RNNTBeamSearch`` and the project's decoders work unchanged; the original model is
    not modified. (:func:`dse.core.onnx_decoder.use_onnx_decoder` swaps those in turn.)
    """
    joiner_dtype = next(model.joiner.parameters(), torch.zeros(())).dtype
    ort_model = copy.copy(model)
    ort_model._modules = dict(model._modules)  # copy.copy shares the dict; keep the original intact
    ort_model.transcriber = OrtTranscriber(session_path, threads=threads, spinning=spinning, dtype=joiner_dtype)
    return ort_model


# -- cache ---------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$DSE_ONNX_CACHE`` or ``~/.cache/dse/onnx``."""
    return Path(os.environ.get("DSE_ONNX_CACHE") or Path.home() / ".cache" / "dse" / "onnx")


def _cache_stem(key: str, chunk_frames: int) -> str:
    """File stem for a key: a readable prefix of the key plus a digest of everything the file depends on."""
    material = json.dumps([FORMAT_VERSION, key, chunk_frames, torch.__version__,
                           _require("onnxruntime").__version__])
    digest = hashlib.sha256(material.encode()).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:40].strip("._")
    return f"{slug}-{digest}" if slug else digest


def _atomic_tmp(target: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp.onnx")
    os.close(fd)
    return Path(tmp)


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _cached(model, chunk_frames: int, precision: str, cache_dir: Path, stem: str) -> tuple[Path, dict]:
    path = cache_dir / f"{stem}.{precision}.onnx"
    meta = cache_dir / f"{stem}.{precision}.json"
    if path.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            return path, dict(info, hit=True, export_s=0.0, quantize_s=0.0,
                              original_export_s=info.get("export_s"), original_quantize_s=info.get("quantize_s"))
        except (OSError, ValueError):
            pass  # unreadable sidecar: rebuild both
    if precision == "fp32":
        tmp = _atomic_tmp(path)
        try:
            info = export_encoder(model, chunk_frames, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        info = dict(info, precision="fp32", quantize_s=0.0)
    else:
        fp32_path, fp32_info = _cached(model, chunk_frames, "fp32", cache_dir, stem)
        tmp = _atomic_tmp(path)
        try:
            q = quantize_graph(fp32_path, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        info = dict(fp32_info, **q, precision="int8", fp32_hit=fp32_info["hit"])
        info.pop("original_export_s", None), info.pop("original_quantize_s", None)
    info = dict(info, bytes=path.stat().st_size, hit=False)
    _write_json_atomic(meta, {k: v for k, v in info.items() if k not in ("hit", "fp32_hit")})
    return path, info


def encoder_onnx(model, chunk_frames: int, precision: str = "fp32", cache_dir=None, key: str = "") -> tuple[Path, dict]:
    """The encoder as an ONNX file, exported (and quantised) once per ``key``.

    ``key`` must identify the model's weights and architecture (e.g. a digest of the
    trial configuration and base weights): the cache trusts it. The file also depends
    on ``chunk_frames`` and the torch/onnxruntime versions, which are folded in.
    Returns ``(path, info)``; ``info["hit"]`` says whether the file came from the cache,
    ``export_s``/``quantize_s`` are the seconds spent in this call (0 on a hit; an int8
    miss whose fp32 export was cached has ``export_s`` 0 and ``fp32_hit`` True).
    Files are written to a temporary name and renamed, so a reader never sees a partial
    file and concurrent workers at worst export twice.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"ONNX encoder precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not key:
        raise BackendError("encoder_onnx needs a non-empty cache key identifying the model's weights")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _cached(model, chunk_frames, precision, cache_dir, _cache_stem(key, chunk_frames))

"""ONNX Runtime sessions for dse's exported networks, and the errors of that backend: no torch.

The torch runtime (:mod:`dse.core.onnx_encoder`, :mod:`dse.core.onnx_decoder`) and the
torch-free one (:mod:`dse.deploy.lite`) open their sessions here, with the same threads and
spinning rules.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from dse.core.errors import DSEError

__all__ = ["BackendError", "DECODER_ONE_THREAD_BYTES", "decoder_threads", "default_spinning", "encoder_layout",
           "open_session", "state_names"]


class BackendError(DSEError):
    """An inference backend (here ONNX Runtime) cannot export, load or run the encoder."""


def _require(module: str):
    """Import an optional dependency of this backend, or say which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"the ONNX Runtime backend needs the Python package {module.split('.')[0]!r} "
                           f"(pip install onnx onnxruntime onnxscript): {exc}") from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CALL_SITE = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in \S+\s*\n\s*(.+)')


def _summary(exc: BaseException, limit: int = 400) -> str:
    """One line naming a failure: the innermost cause's type and first line, and the user-code line.

    torch.onnx wraps torch.export's errors ("Failed to export the model with
    torch.export ..."); the innermost cause says what went wrong (e.g. a guard on a
    data-dependent value) and torch.export names the source line that triggered it.
    """
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    root = chain[-1]
    lines = [ln.strip() for ln in _ANSI.sub("", str(root)).splitlines() if ln.strip()]
    text = f"{type(root).__name__}: {lines[0] if lines else ''}"
    for e in chain:
        site = _CALL_SITE.search(_ANSI.sub("", str(e)))
        if site:
            text += f" at {Path(site.group(1)).name}:{site.group(2)} `{site.group(3).strip()}`"
            break
    return text if len(text) <= limit else text[: limit - 3] + "..."


def default_spinning() -> bool:
    """Whether ONNX Runtime's intra-op threads should spin: as torch's OpenMP threads do.

    ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep between operators) turns spinning off, anything
    else leaves it on, so one setting governs both runtimes of a configuration. On a quiet
    machine spinning is what makes a second thread pay: the base encoder at int8 and 2
    threads ran 1.37x faster spinning than not, and without spinning 2 threads were no faster
    than 1 (a one-off probe; ``benchmarks/stream_base.py`` prints the threads and spinning it ran with). On
    shared cores a spinning thread holds the core another one needs; set PASSIVE there.
    """
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def state_names(layers: int, use_memory: bool) -> list:
    """An exported encoder's state inputs in order: ``past_length`` ``(L, 1, 1)`` int32, then each layer's
    left-context keys ``lc_key_i`` and values ``lc_val_i`` ``(Lc, D)`` [and memory ``memory_i`` ``(M, D)``];
    its outputs are the same names with ``next_`` (:mod:`dse.core.onnx_encoder`)."""
    slots = ("lc_key", "lc_val") + (("memory",) if use_memory else ())
    return ["past_length"] + [f"{slot}_{i}" for slot in slots for i in range(layers)]


def encoder_layout(session, path: Path) -> dict:
    """The geometry of an encoder session exported by dse: ``chunk_frames``, ``n_mels``, ``layers``,
    ``left_context``, ``dim``, ``memory`` (slots, 0 for none), ``state`` (:func:`state_names`) and
    ``outputs`` (output, output_lengths, then the next state, in the order of ``state``)."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if "lc_key" in inputs:
        raise BackendError(f"{path} holds the state stacked over layers, as dse exported it before its "
                           "ONNX format 4; export it again")
    layers = sum(name.startswith("lc_key_") for name in inputs)
    use_memory = "memory_0" in inputs
    names = state_names(layers, use_memory) if layers else []
    expected = ["input", "lengths"] + names
    missing = [n for n in expected if n not in inputs] + [n for n in ("output", "output_lengths")
                                                            if n not in outputs]
    missing += [f"next_{n}" for n in names if f"next_{n}" not in outputs]
    if not layers or missing:
        raise BackendError(f"{path} is not an encoder exported by dse (missing {', '.join(missing) or 'lc_key_0'}; "
                           f"it has inputs {', '.join(inputs)})")
    left, dim = inputs["lc_key_0"]
    return {"chunk_frames": inputs["input"][1], "n_mels": inputs["input"][2], "layers": layers,
            "left_context": left, "dim": dim, "memory": inputs["memory_0"][0] if use_memory else 0,
            "state": names, "outputs": ["output", "output_lengths"] + [f"next_{n}" for n in names]}


DECODER_ONE_THREAD_BYTES = 4 * 2**20


def decoder_threads(predictor: Path, joiner: Path, threads: int) -> int:
    """Intra-op threads for the predictor and joiner sessions of a configuration run with ``threads``.

    Both run a handful of rows per call, so their cost is reading their weights plus a fixed
    cost per operator. Small networks (the files together under
    :data:`DECODER_ONE_THREAD_BYTES`) run on the calling thread: a second thread only adds a
    wake-up and a hand-over per operator. Measured interleaved in one process, 2 threads: the
    embedded default's fp32 decoder (2.4 MiB) streamed the default configuration 1.04x [95% 1.02,
    1.10] faster with one-thread decoder sessions than with two, while the base model's int8
    decoder (13 MiB) streamed greedy search 0.94x [0.86, 1.02] as fast, no gain (one-off probes).
    Large ones get ``threads``.
    """
    # a missing file counts 0 here: open_session names it
    size = sum(Path(p).stat().st_size for p in (predictor, joiner) if Path(p).is_file())
    return 1 if size < DECODER_ONE_THREAD_BYTES else int(threads)


def open_session(path: Path, threads: int, spinning: bool, what: str):
    """An ONNX Runtime CPU session for one of dse's exported networks (``what`` names it in errors).

    ``threads`` intra-op threads (inter-op 1: each graph is one chain); ``spinning``:
    ``session.intra_op.allow_spinning``, stopped when a call ends (``session.force_spinning_stop``),
    so the pool spins between the operators of a call, not into torch's search after it."""
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"ONNX {what} file {path} does not exist")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(f"ONNX Runtime cannot load the {what} file {path} ({path.stat().st_size} bytes): "
                           f"{_summary(exc)}; delete it to have it exported again") from exc

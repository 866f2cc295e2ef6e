"""Export one trial of a study as a self-contained deployment bundle: ``python -m dse.export``.

The trial's model is rebuilt exactly as the study measured it (same base weights,
same architecture edits, the adapted weights from the adaptation cache, the same
precision transform) and written in its deployed form with everything a runtime
needs to stream it and nothing it does not: see :mod:`dse.deploy.runtime` for the layout,
``python -m dse.transcribe`` to use a bundle and ``python -m dse.verify`` to check
that it still scores what the study recorded.

Choosing the trial: ``--trial N``, or ``--pick CONDITIONS`` with comma-separated
conditions on recorded metrics (``wer<=0.08,ttft_s<0.5``; operators ``<= < >= > ==
!=``) over COMPLETE trials, of which the one with the smallest ``--minimize`` metric
(default ``rtf_p95``; ties go to the lower trial number) is exported.

The bundle is written into a temporary directory beside ``--out`` and renamed into
place when complete, so a failed export leaves nothing behind. An existing non-empty
``--out`` is replaced only with ``--force``, and only when it is a bundle (its ``config.json``
and ``MANIFEST.sha256`` there, nothing else): never any other folder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import math
import operator
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from dse.deploy import lite, runtime
from dse.core.errors import DSEError, cli_error, not_empty, redact
from dse.core.files import check_creatable
from dse.core.interrupts import INTERRUPTS
from dse.core.precision import apply_precision
from dse.core.record import TrialRecord

__all__ = ["bundle_path", "export_bundle", "not_a_bundle", "parse_pick", "select_trial", "main"]

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq,
        "!=": operator.ne}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*([^\s<>=!]+)\s*$")
ARTIFACT_CHUNKS = 2


# -- choosing a trial -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Condition:
    """``metric op value`` on a trial's recorded metrics; a metric that was not measured never holds."""
    metric: str
    op: str
    value: float

    def holds(self, metrics: dict) -> bool:
        v = metrics.get(self.metric)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and _OPS[self.op](v, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_pick(text: str) -> list[Condition]:
    """``"wer<=0.08,ttft_s<0.5"`` -> conditions; raises :class:`DSEError` naming the bad part."""
    conditions = []
    for part in text.split(","):
        m = _CONDITION.match(part)
        if not m:
            raise DSEError(f"--pick condition {part.strip()!r} is not METRIC OP NUMBER "
                           f"(OP one of {' '.join(_OPS)}), e.g. 'wer<=0.08,ttft_s<0.5'")
        try:
            value = float(m.group(3))
        except ValueError:
            value = math.nan
        if math.isnan(value):  # no metric compares true with NaN: nothing would ever match
            raise DSEError(f"--pick condition {part.strip()!r}: {m.group(3)!r} is not a number") from None
        conditions.append(Condition(m.group(1), m.group(2), value))
    return conditions


def _complete_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def select_trial(study, trial: Optional[int] = None, pick: Optional[str] = None, minimize: str = "rtf_p95"):
    """The ``FrozenTrial`` numbered ``trial``, or the COMPLETE trial meeting ``pick`` with the least ``minimize``."""
    if (trial is None) == (pick is None):
        raise DSEError("give exactly one of a trial number (--trial N) or conditions (--pick 'wer<=0.08')")
    if trial is not None:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        if trial not in by_number:
            span = f"0..{max(by_number)}" if by_number else "none"
            raise DSEError(f"study {study.study_name!r} has no trial {trial} (trials: {span})")
        t = by_number[trial]
        if t.state.name != "COMPLETE":
            reason = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason")
            raise DSEError(f"trial {trial} of study {study.study_name!r} is {t.state.name}"
                           + (f" ({reason})" if reason else "") + "; only COMPLETE trials can be exported")
        return t
    conditions = parse_pick(pick)
    complete = _complete_trials(study)
    if not complete:
        raise DSEError(f"study {study.study_name!r} has no COMPLETE trial; run python -m dse.run first")
    metrics = {t.number: TrialRecord.of_trial(t).metrics for t in complete}
    known = sorted({k for m in metrics.values() for k in m})
    for name in [c.metric for c in conditions] + [minimize]:
        if name not in known:
            raise DSEError(f"metric {name!r} is not recorded by the trials of study {study.study_name!r}; "
                           f"recorded metrics: {', '.join(known)}")
    matches = [t for t in complete if all(c.holds(metrics[t.number]) for c in conditions)]
    ranked = [t for t in matches if isinstance(metrics[t.number].get(minimize), (int, float))]
    if not ranked:
        best = []
        for c in conditions:
            values = [(metrics[t.number][c.metric], t.number) for t in complete
                      if isinstance(metrics[t.number].get(c.metric), (int, float))]
            if values:
                lo, hi = min(values), max(values)
                best.append(f"{c.metric} ranges from {lo[0]:.4g} (trial {lo[1]}) to {hi[0]:.4g} (trial {hi[1]})")
            else:
                best.append(f"{c.metric} was not measured in any trial")
        what = ",".join(map(str, conditions))
        extra = f" with {minimize} measured" if matches else ""
        raise DSEError(f"no COMPLETE trial of study {study.study_name!r} satisfies {what}{extra} "
                       f"({len(complete)} complete; {'; '.join(best)}); loosen --pick")
    ordered = sorted(ranked, key=lambda t: (metrics[t.number][minimize], t.number))
    base = _baseline(complete)
    if base is None or base not in matches:  # no baseline trial, or one the conditions rule out
        return ordered[0]
    for t in ordered:  # never a trial the baseline dominates: it must beat the baseline beyond noise
        if t.number == base.number or _beats(study, t, base):
            return t
    return base


def _baseline(trials):
    return next((t for t in trials if t.user_attrs.get("anchor") == "baseline"), None)


def _beats(study, t, base) -> bool:
    from dse.search.front import beats, point_of

    return beats(point_of(t, base.number), point_of(base, base.number), study.user_attrs.get("pair_speedups"))


def pick_note(study, chosen) -> str:
    """What ``--pick`` chose, against the baseline in words (with the intervals)."""
    from dse.search.front import compare, describe_against_baseline, point_of

    base = _baseline(_complete_trials(study))
    if base is None:
        return f"picked trial {chosen.number}"
    if chosen.number == base.number:
        return (f"picked trial {chosen.number}, the baseline: no configuration that meets the conditions beats it "
                "beyond the timing noise")
    c = compare(point_of(chosen, base.number), point_of(base, base.number), study.user_attrs.get("pair_speedups"))
    return "picked " + describe_against_baseline(c, f"trial {chosen.number}")


def load_study(storage_url: str, study_name: str):
    """``optuna.load_study`` with errors that say what exists; never creates a storage file."""
    import optuna

    from dse.search.storage import make_storage, sqlite_path

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = sqlite_path(storage_url)
    if path is not None and path.is_dir():
        raise DSEError(f"storage {redact(storage_url)!r}: {path} is a directory, not an SQLite file; pass --storage "
                       "with the URL the study was run with")
    if path is not None and not path.is_file():
        raise DSEError(f"storage {redact(storage_url)!r}: file {path} not found; pass --storage with the URL "
                       "the study was run with")
    storage = make_storage(storage_url, writable=False)  # one-line errors, password masked
    try:
        names = optuna.get_all_study_names(storage=storage)
    except Exception as exc:
        from dse.search.storage import storage_error

        raise storage_error(storage_url, exc) from None
    if study_name not in names:
        raise DSEError(f"no study {study_name!r} in {redact(storage_url)}; studies there: "
                       f"{', '.join(sorted(names)) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=storage)


# -- rebuilding the trial -------------------------------------------------------------------
def _load_base(weights: str, name: str):
    from dse.core.models import load_checkpoint, load_torchaudio_bundle, random_model

    if weights == "random":
        return random_model(name)
    kind, _, where = weights.partition(":")
    if kind == "checkpoint":
        loaded = load_checkpoint(where)
    elif kind == "torchaudio":
        loaded = load_torchaudio_bundle(where)
    else:
        raise DSEError(f"the trial records model weights {weights!r}; expected 'random', 'checkpoint:PATH' "
                       "or 'torchaudio:DIR'")
    if loaded.name != name:
        raise DSEError(f"{where}: holds architecture {loaded.name!r}, the study recorded {name!r}")
    return loaded


def _attach_lm(loaded, model_attr: dict, trial_number: int):
    """The language model the study fused, checked against the hash it recorded."""
    from dse.core.models import with_lm

    path, recorded = model_attr.get("lm"), model_attr.get("lm_sha256")
    if not path:
        raise DSEError(f"trial {trial_number} fused a language model but the study records none")
    if not os.path.isfile(path):
        raise DSEError(f"trial {trial_number} fused the language model {path}, which is gone; put it back")
    if recorded and runtime.sha256_file(path) != recorded:
        raise DSEError(f"the language model {path} changed since trial {trial_number} measured it "
                       "(sha256 differs); export from a study run with this file")
    return with_lm(loaded, path)


def _rebuild(study, trial, cache_dir: Optional[str], log: Callable[[str], None]):
    """(Built, adaptation record) for ``trial``, compiled off: the bundle holds eager weights."""
    from dse.core.config import TrialConfig
    from dse.core.build import build_recognizer

    record = TrialRecord.of_trial(trial)
    model_attr = record.model or study.user_attrs.get("model")
    if not model_attr:
        raise DSEError(f"trial {trial.number} records no model; it was not written by python -m dse.run")
    if not record.config:
        raise DSEError(f"trial {trial.number} records no configuration; it was not written by python -m dse.run")
    loaded = _load_base(model_attr["weights"], model_attr["name"])
    config = TrialConfig.from_dict(record.config)
    if config.lm_weight > 0:
        loaded = _attach_lm(loaded, model_attr, trial.number)
    resolved = config.resolved(loaded.arch)
    adapt_fn, adaptation = None, {"steps": config.adapt_steps, "source": "none"}
    if config.adapt_steps > 0:
        from dse.search.adapt import Adapter

        adapt_set = study.user_attrs.get("adapt_set")
        if not adapt_set:
            raise DSEError(f"trial {trial.number} adapted its weights but study {study.study_name!r} records "
                           "no adaptation split")
        adapter = Adapter(loaded, adapt_set, cache_dir=cache_dir)
        key = adapter.cache_key(resolved)
        cached = (adapter.cache_dir / f"{key}.pt").exists()
        adaptation.update(source="cache" if cached else "re-adapted", cache_dir=str(adapter.cache_dir.absolute()),
                          cache_key=key)
        if not cached:
            log(f"adapted weights of trial {trial.number} are not in the cache {adapter.cache_dir}: "
                f"adapting again ({config.adapt_steps} steps); the result may differ from the study's")

        adapt_fn = adapter
    log(f"building trial {trial.number} ({model_attr['name']}, {config.precision})")
    built = build_recognizer(loaded, config.replace(compile="off"), adapt_fn=adapt_fn)
    recorded = record.metrics.get("params")
    if recorded is not None and recorded != built.params:
        raise DSEError(f"the rebuilt model has {built.params} parameters, trial {trial.number} recorded {recorded}; "
                       f"the base weights {model_attr['weights']} changed since the study")
    return built, adaptation


# -- writing the bundle ---------------------------------------------------------------------
def _encoder_outputs(infer: Callable, recognizer, chunks: torch.Tensor, explicit_state: bool = False) -> list[torch.Tensor]:
    """Outputs of ``infer(x, lengths, states)`` for ``chunks`` ``(n, 1, frames, n_mels)``, state carried.

    ``explicit_state``: start from the Emformer's zero state instead of ``None``.
    """
    state = recognizer.initial_encoder_state()
    if state is None and explicit_state:
        state = [layer._init_state(1, None) for layer in recognizer.model.transcriber.transformer.emformer_layers]
    length = torch.tensor([chunks.size(2)])
    outs = []
    with torch.inference_mode():
        for x in chunks:
            out, _, state = infer(x.to(recognizer.dtype), length, state)
            outs.append(out)
    return outs


def _probe_chunks(recognizer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(ARTIFACT_CHUNKS, 1, recognizer.chunk_frames, recognizer.logmel.config.n_mels, generator=gen)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class _Infer(torch.nn.Module):
    """The encoder's per-chunk ``infer`` as a module's ``forward``, for ``torch.export``."""

    def __init__(self, transcriber):
        super().__init__()
        self.transcriber = transcriber

    def forward(self, x, lengths, states):
        return self.transcriber.infer(x, lengths, states)


ONNX_FILE = "encoder.onnx"


def _write_onnx_encoder(directory: Path, transcriber, precision: str) -> dict:
    """Copy the ONNX encoder the trial ran (``backend=onnxruntime``) into the bundle; its SHA-256 goes
    in config.json and, as every file's, in MANIFEST.sha256."""
    path = directory / ONNX_FILE
    shutil.copyfile(transcriber.path, path)
    memory = bool(getattr(transcriber, "use_memory", False))
    artifact = {"file": ONNX_FILE, "kind": "onnx", "backend": "onnxruntime", "precision": precision,
                "sha256": runtime.sha256_file(path), "bytes": path.stat().st_size,
                "call": "onnxruntime.InferenceSession(file) with inputs input (1, frames, n_mels) float32, lengths (1,) "
                        "int64, past_length (layers, 1, 1) int32, lc_key_i and lc_val_i (left context, dim) float32 for "
                        "each layer i" + (", memory_i (slots, dim) float32" if memory else "") + " -> output, "
                        "output_lengths and the same state named next_* (dse.core.onnx_encoder.OrtTranscriber runs it; "
                        "dse.core.ort_session.state_names lists it); this is what the runtime streams",
                "memory": memory}
    decoder = (getattr(transcriber, "export_info", None) or {}).get("decoder")
    if decoder:  # the predictor and joiner the trial ran in ONNX Runtime
        files = {}
        for name, source in decoder["paths"].items():
            target = directory / f"{name}.onnx"
            shutil.copyfile(source, target)
            files[name] = {"file": target.name, "sha256": runtime.sha256_file(target), "bytes": target.stat().st_size}
        artifact["decoder"] = dict(files, call=(
            "predictor.onnx: tokens (B, 1) int64, h and c (layers, B, hidden) float32 -> output (B, 1, E), "
            "next_h, next_c; joiner.onnx: source (B, T, E), target (B, U, E) -> logits (B, T, U, V) "
            "(dse.core.onnx_decoder.OrtPredictor and OrtJoiner run them)"))
    return artifact


def _write_encoder_artifact(directory: Path, recognizer) -> tuple[Optional[dict], Optional[str]]:
    """Try TorchScript, then ``torch.export``, of the encoder; keep one only if it reproduces eager outputs.

    Returns (artifact description or None, why TorchScript and/or torch.export failed or None).
    """
    transcriber = recognizer.model.transcriber
    probe = _probe_chunks(recognizer)
    expected = _encoder_outputs(transcriber.infer, recognizer, probe)
    errors = []
    path = directory / "encoder.ts"
    try:
        with _quiet_torch():
            torch.jit.save(torch.jit.script(transcriber), str(path))
            scripted = torch.jit.load(str(path))
            if not _same(_encoder_outputs(scripted.infer, recognizer, probe), expected):
                raise DSEError("the scripted encoder's outputs differ from the eager encoder's")
        return {"file": path.name, "kind": "torchscript",
                "call": "torch.jit.load(file).infer(input (1, frames, n_mels), lengths (1,), states or None) "
                        "-> (output, lengths, states)"}, None
    except Exception as exc:
        path.unlink(missing_ok=True)
        errors.append(f"torch.jit.script: {type(exc).__name__}: {_first_line(exc)}")
    path = directory / "encoder.pt2"
    try:
        example_state = recognizer.initial_encoder_state() or [
            layer._init_state(1, None) for layer in transcriber.transformer.emformer_layers]
        example = (probe[0].to(recognizer.dtype), torch.tensor([probe.size(2)]), example_state)
        with _quiet_torch():
            torch.export.save(torch.export.export(_Infer(transcriber).eval(), example), str(path))
            program = torch.export.load(str(path)).module()
            if not _same(_encoder_outputs(program, recognizer, probe, explicit_state=True), expected):
                raise DSEError("the exported encoder's outputs differ from the eager encoder's")
        return {"file": path.name, "kind": "torch.export",
                "call": "torch.export.load(file).module()(input (1, frames, n_mels), lengths (1,), states) "
                        "-> (output, lengths, states); states may not be None"}, "; ".join(errors)
    except Exception as exc:
        path.unlink(missing_ok=True)
        errors.append(f"torch.export: {type(exc).__name__}: {_first_line(exc)}")
    return None, "; ".join(errors)


@contextlib.contextmanager
def _quiet_torch():
    """Silence warnings, logging and stderr for the block (a failed ``torch.export`` prints whole graphs)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_readme(directory: Path, config: dict, metrics: dict, trial_config, vocabulary: dict) -> None:
    m = metrics["metrics"]

    def f(key, spec=".4g", unit=""):
        v = m.get(key)
        return "not measured" if v is None else f"{format(v, spec)}{unit}"

    tc = config["trial_config"]
    machine = metrics.get("machine") or {}
    ci = m.get("speedup_ci95")
    lines = [
        f"# Streaming recognizer: study `{config['study']['name']}`, trial {config['study']['trial']}",
        "",
        f"Model `{config['model']['name']}` ({config['model']['weights']}), {config['model']['params']:,} parameters, "
        f"{f('weight_mib', '.2f', ' MiB')} of weights in {tc['precision']}; beam width {tc['beam_width']}, "
        + (f"LM weight {tc['lm_weight']}, " if tc.get("lm_weight") else "")
        + f"decoder temperature {tc.get('temperature', 1.0):g}, " +
        f"{tc['threads']} thread(s), segment {config['architecture']['segment_length']} + right context "
        f"{config['architecture']['right_context_length']} frames"
        + (f", MoE {config['moe']['experts']} experts top-{config['moe']['top_k']} (hidden "
           f"{config['moe']['hidden']}) in layers {config['moe']['layers']}" if config.get("moe") else "") + ".",
        "",
        "## Measured by the study",
        "",
        "| metric | value |", "| --- | --- |",
        f"| WER / CER | {f('wer')} / {f('cer')} |",
        f"| RTF mean / p50 / p95 | {f('rtf_mean')} / {f('rtf_p50')} / {f('rtf_p95')} |",
        f"| chunk latency p50 / p95 / p99 | {f('chunk_latency_p50_ms', '.2f')} / {f('chunk_latency_p95_ms', '.2f')} "
        f"/ {f('chunk_latency_p99_ms', '.2f', ' ms')} |",
        f"| time to first token (median) | {f('ttft_s', '.3f', ' s')} |",
        f"| speedup vs the study baseline, same run | {f('speedup', '.3f')}"
        + (f" (95 % interval {ci[0]:.3f} to {ci[1]:.3f})" if ci else "") + " |",
        "",
        f"Eval set `{config['eval']['set']}`" + (f" (first {config['eval']['limit']} utterances)"
                                                 if config['eval']['limit'] else "")
        + f"; machine: {machine.get('cpu_model', 'unknown')}, torch {machine.get('torch', '?')}. "
          "Absolute times belong to that machine; the speedup ratio travels better.",
        "",
        "## Use",
        "",
        "    python -m dse.transcribe THIS_DIR audio.wav --partial   # any soundfile format",
        "    arecord -f S16_LE -r 16000 -c 1 | python -m dse.transcribe THIS_DIR -",
        "    python -m dse.verify THIS_DIR                           # re-measure WER and speedup here",
        "",
        "In Python: `from dse.deploy.runtime import load, stream; rec = load(THIS_DIR); text = stream(rec, waveform)` "
        "with `waveform` a float tensor `(samples,)` at 16 kHz.",
        "",
        "## Files",
        "",
        "`weights.pt` (state dict of the deployed model), `features.json` (mel front end, normalisation), "
        "`vocabulary.json`, `config.json`, `metrics.json`"
        + (f", `{runtime.LM_FILE}` (character {config['language_model']['order']}-gram language model, fused "
           f"with weight {config['language_model']['weight']})" if config.get("language_model") else "")
        + "; `MANIFEST.sha256` checks them "
        "(`sha256sum -c MANIFEST.sha256`), and loading refuses a bundle whose files do not match.",
        "",
    ]
    art = config.get("encoder_artifact")
    if art and art["kind"] == "onnx":
        lines.append(f"Encoder: `{art['file']}` ({art['precision']} ONNX, sha256 {art['sha256'][:16]}...), run with "
                     "ONNX Runtime as the study measured it (`pip install onnxruntime`)"
                     + ("; so are the predictor and joiner (`predictor.onnx`, `joiner.onnx`), the search runs in "
                        "numpy and the features in torch" if art.get("decoder") else "; the predictor, joiner, features and search "
                        "run in torch")
                     + ", so the runtime needs torch, torchaudio, onnxruntime, numpy and soundfile. "
                     f"`weights.pt` also holds the torch encoder, which `python -m dse.verify` uses for its fp32 "
                     f"reference. The ONNX file alone: {art['call']}.")
        if not lite.needs_torch(config, trial_config, vocabulary):
            lines += ["", "This bundle also runs without torch, on onnxruntime and numpy alone (its search and "
                          "language model included): `from dse.deploy import lite; "
                          "lite.load(DIR).transcribe(samples)` (float32 samples at the feature rate). Its front end "
                          "rounds differently from torch's in near-silent frames, so a transcript can differ; "
                          "`python -m dse.verify DIR --lite` scores it against this record."]
    elif art:
        lines.append(f"Encoder artifact: `{art['file']}` ({art['kind']}), the streaming encoder alone: {art['call']}.")
    else:
        lines.append(f"No encoder artifact: {config['encoder_artifact_error']}")
    if config["adaptation"]["source"] == "re-adapted":
        lines += ["", "**Warning**: the adapted weights the study measured were not in the adaptation cache; "
                      "this bundle's weights were adapted again and may not reproduce the recorded metrics "
                      "(run python -m dse.verify)."]
    if config["model"]["weights"] == "random":
        lines += ["", "**Warning**: random weights (latency work only); accuracy is not measured."]
    if tc.get("compile", "off") != "off":
        lines += ["", f"The study timed this model with torch.compile (mode {tc['compile']}); the runtime "
                      "compiles the encoder on load, so the first chunks pay the compile time."]
    (directory / runtime.README_FILE).write_text("\n".join(lines) + "\n")


def features_record(loaded) -> dict:
    """A bundle's ``features.json``: the front end's configuration and normalisation statistics."""
    return {"config": loaded.features.to_dict(), "mean": loaded.mean.tolist(), "invstd": loaded.invstd.tolist()}


def _write_bundle(directory: Path, study, trial, storage_url: str, built, adaptation: dict) -> None:
    loaded = built.loaded
    deployed = built.recognizer.model
    # built without compile (eager weights are what a bundle holds); record the mode the study timed
    record = TrialRecord.of_trial(trial)
    trial_config = built.config.replace(compile=record.config.get("compile", "off"))
    onnx = built.config.backend == "onnxruntime"
    # An ONNX Runtime bundle's weights.pt still holds the whole torch model in the trial's precision,
    # from which verify rebuilds its fp32 timing reference.
    torch_weights = (deployed if not onnx else loaded.model if built.config.precision == "fp32"
                     else apply_precision(loaded.model, built.config.precision))  # fp32: no copy to make
    torch.save(torch_weights.state_dict(), directory / runtime.WEIGHTS_FILE)
    _write_json(directory / runtime.FEATURES_FILE, features_record(loaded))
    vocab = loaded.tokenizer.to_dict()
    if vocab["kind"] == "sentencepiece":
        shutil.copyfile(vocab.pop("model_path"), directory / "vocabulary.model")
        vocab["model_file"] = "vocabulary.model"
    _write_json(directory / runtime.VOCABULARY_FILE, vocab)
    if onnx:
        artifact, artifact_error = _write_onnx_encoder(directory, deployed.transcriber, built.config.precision), None
    else:
        artifact, artifact_error = _write_encoder_artifact(directory, built.recognizer)
    cfg = built.config
    language_model = None
    if cfg.lm_weight > 0:
        shutil.copyfile(loaded.lm_path, directory / runtime.LM_FILE)
        lm = built.recognizer.decoder.lm
        language_model = {"file": runtime.LM_FILE, "order": lm.order, "weight": cfg.lm_weight,
                          "sha256": runtime.sha256_file(directory / runtime.LM_FILE)}
    moe = None
    if cfg.is_moe:
        moe = {"experts": cfg.moe_experts, "top_k": cfg.moe_top_k, "every": cfg.moe_every,
               "hidden": cfg.moe_hidden or loaded.arch["transformer_ffn_dim"], "layers": loaded.info["moe_layers"]}
    eval_info = {"set": study.user_attrs.get("eval_set"), "limit": study.user_attrs.get("eval_limit")}
    metrics = dict(record.metrics)
    speedup = record.speedup or {}
    metrics["speedup_ci95"] = speedup.get("speedup_ci95")
    metrics_doc = {
        "study": study.study_name, "trial": trial.number, "metrics": metrics, "speedup": speedup,
        "machine": record.machine, "wer_by_slice": record.wer_by_slice,
        "rtf_mean_ci95": record.rtf_mean_ci95, "transcripts": record.transcripts,
        "utterance_errors": record.utterance_errors,
        "reused_wer_from": record.reused_wer_from, "phases_s": record.phases_s,
        "spread_warning": record.spread_warning, "eval": eval_info,
        "adapt": record.adapt or {}, "adapted_again": adaptation["source"] == "re-adapted",
    }
    _write_json(directory / runtime.METRICS_FILE, metrics_doc)
    from dse import __version__

    config = {
        "format": runtime.BUNDLE_FORMAT, "format_version": runtime.BUNDLE_VERSION, "dse_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "study": {"name": study.study_name, "trial": trial.number, "storage": redact(storage_url)},
        "model": {"name": loaded.name, "weights": loaded.weights, "params": built.params,
                  "weight_mib": built.weight_mib},
        "trial_config": trial_config.to_dict(), "baseline_config": study.user_attrs.get("baseline_config"),
        "architecture": loaded.arch, "num_symbols": loaded.tokenizer.num_symbols, "moe": moe,
        "eval": eval_info, "adaptation": adaptation, "language_model": language_model,
        "encoder_artifact": artifact, "encoder_artifact_error": artifact_error,
        "torch": torch.__version__,
    }
    _write_json(directory / runtime.CONFIG_FILE, config)
    _write_readme(directory, config, metrics_doc, trial_config, vocab)
    runtime.write_manifest(directory)
    _check_reload(directory, built.recognizer)


def _check_reload(directory: Path, recognizer) -> None:
    """The runtime's rebuild of the written bundle must compute exactly what the deployed model computes."""
    reloaded = runtime.load(directory, compile=False)
    probe = _probe_chunks(recognizer)
    if not _same(_encoder_outputs(reloaded.model.transcriber.infer, reloaded, probe),
                 _encoder_outputs(recognizer.model.transcriber.infer, recognizer, probe)):
        raise DSEError("the bundle, loaded back, computes other encoder outputs than the model it was "
                       "exported from; this is a bug in dse.deploy.export/dse.deploy.runtime")


def not_a_bundle(directory: Path) -> Optional[str]:
    """Why ``directory`` is not a dse bundle that ``--force`` may replace (None when it is one): it
    must hold a ``config.json`` of format ``dse-bundle`` and ``MANIFEST.sha256``, and nothing
    the manifest does not list, so that no file of anyone else's is ever deleted."""
    config_path = directory / runtime.CONFIG_FILE
    manifest = directory / runtime.MANIFEST_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict) or config.get("format") != runtime.BUNDLE_FORMAT:
        return f"it has no {runtime.CONFIG_FILE} of format {runtime.BUNDLE_FORMAT!r}"
    if not manifest.is_file():
        return f"it has no {runtime.MANIFEST_FILE}"
    try:
        listed = {line.partition("  ")[2] for line in manifest.read_text().splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError):
        return f"its {runtime.MANIFEST_FILE} is unreadable"
    others = sorted(p.name for p in directory.iterdir()
                    if p.name != runtime.MANIFEST_FILE and (p.name not in listed or p.is_symlink() or not p.is_file()))
    if others:
        return f"it holds what its {runtime.MANIFEST_FILE} does not list: {', '.join(others[:5])}" + (
            f" and {len(others) - 5} more" if len(others) > 5 else "")
    return None


def _check_target(out: Path, force: bool) -> None:
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise DSEError(f"--out {out} is the folder this command runs in, or holds it; choose another path")
    check_creatable(out, "--out")
    if out.exists() and not out.is_dir():
        raise DSEError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DSEError(f"--out {out} exists and is not empty; pass --force to replace it, or choose another path")
        why = not_a_bundle(out)
        if why:
            raise DSEError(f"--out {out} is not a dse bundle ({why}); --force replaces only a bundle "
                           "that dse.export wrote: choose another path")


def bundle_path(deploy_dir, name: str) -> Path:
    """The folder ``name`` inside ``deploy_dir``, for writers that must stay inside it (the dashboard).

    ``name`` is relative (one or more folder names); an absolute path, ``..``, or a symbolic link
    leading out of ``deploy_dir`` raises :class:`DSEError`.
    """
    root = Path(deploy_dir).expanduser().resolve()
    text = (name or "").strip()
    if not text:
        raise DSEError(f"give a folder name for the bundle (it is written under {root})")
    relative = Path(text)
    if relative.is_absolute() or text.startswith(("/", "\\", "~")) or (text[1:2] == ":" and text[0].isalpha()):
        raise DSEError(f"{text!r} is an absolute path; give a folder name, written under {root}")
    parts = text.replace("\\", "/").split("/")
    if ".." in parts:
        raise DSEError(f"{text!r} contains '..'; give a folder name, written under {root}")
    target = (root / relative).resolve()
    if target == root or not target.is_relative_to(root):
        raise DSEError(f"{text!r} is not a folder under {root}; give a folder name such as 'moe-trial3'")
    return target


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    _check_target(out, force)
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # an empty directory is replaced, a missing one created


def export_bundle(storage_url: str, study_name: str, out_dir, trial: Optional[int] = None,
                  pick: Optional[str] = None, minimize: str = "rtf_p95", *, force: bool = False,
                  cache_dir: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> Path:
    """Write trial ``trial`` (or the one ``pick`` selects, see :func:`select_trial`) as a bundle in ``out_dir``.

    ``cache_dir``: the adaptation cache the study used (default ``~/.cache/dse/adapted``).
    Returns the bundle's path. Raises :class:`DSEError` for a bad choice, a missing
    study or weights, or an existing non-empty ``out_dir`` without ``force``.
    """
    log = log or (lambda msg: None)
    out = Path(not_empty(out_dir, "--out", "the folder to write the bundle to")).absolute()
    _check_target(out, force)
    study = load_study(storage_url, study_name)
    chosen = select_trial(study, trial, pick, minimize)
    if pick is not None:
        log(f"{pick_note(study, chosen)} ({minimize}={TrialRecord.of_trial(chosen).metrics[minimize]:.4g})")
    built, adaptation = _rebuild(study, chosen, cache_dir, log)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise DSEError(f"--out {out}: cannot create a folder in {out.parent} ({exc.strerror})") from None
    try:
        os.chmod(tmp, 0o755)
        log(f"writing {out}")
        _write_bundle(tmp, study, chosen, storage_url, built, adaptation)
        with INTERRUPTS.held(last=True):  # never half-way between the old bundle and the new one
            _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    from dse.search.storage import DEFAULT_STORAGE

    p = argparse.ArgumentParser(prog="python -m dse.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, metavar="NAME", help="name of the study in the storage (as given to dse.run)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, metavar="N", help="number of the COMPLETE trial to export")
    which.add_argument("--pick", metavar="CONDITIONS", help="comma-separated conditions on recorded metrics, e.g. 'wer<=0.08,ttft_s<0.5'; "
                                      "exports the matching COMPLETE trial with the least --minimize")
    p.add_argument("--minimize", metavar="METRIC",
                   help="metric that ranks the trials --pick matches, smallest wins (default rtf_p95)")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle directory to create (must not exist, or be empty)")
    p.add_argument("--storage", default=os.environ.get("DSE_STORAGE", DEFAULT_STORAGE), metavar="URL",
                   help=f"Optuna storage URL the study lives in (default $DSE_STORAGE or {DEFAULT_STORAGE})")
    p.add_argument("--force", action="store_true", help="replace an existing --out bundle (never a folder that is not a dse bundle)")
    p.add_argument("--cache-dir", metavar="DIR", help="adaptation cache the study used (default ~/.cache/dse/adapted)")
    args = p.parse_args(argv)
    if args.trial is not None and args.minimize is not None:
        p.error("--minimize ranks the trials --pick matches; with --trial N there is nothing to rank")

    def log(msg):
        print(msg, file=sys.stderr)

    try:
        with INTERRUPTS.installed():  # SIGTERM stops an export as Ctrl-C does: the partial folder is removed
            out = export_bundle(args.storage, args.study, args.out, trial=args.trial, pick=args.pick,
                                minimize=args.minimize or "rtf_p95", force=args.force, cache_dir=args.cache_dir, log=log)
    except DSEError as exc:
        return cli_error(exc)
    except KeyboardInterrupt:
        log(f"interrupted: nothing written to {args.out}")
        return 130
    config = json.loads((out / runtime.CONFIG_FILE).read_text())
    art = config["encoder_artifact"]
    print(f"exported trial {config['study']['trial']} of study {args.study!r} to {out}")
    print(f"encoder artifact: {art['file'] + ' (' + art['kind'] + ')' if art else 'none (' + config['encoder_artifact_error'] + ')'}")
    print(f"try: python -m dse.transcribe {out} audio.wav --partial")
    return 0


if __name__ == "__main__":
    sys.exit(main())

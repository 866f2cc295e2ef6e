"""Optuna studies holding the records ``python -m dse.run`` writes, made without running a model.

Each :class:`TrialSpec` names a configuration (knobs that differ from the baseline) and its
headline numbers; :func:`trial_attrs` expands it into a full trial record, and
:func:`write_study` adds the trials to a real Optuna storage.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from dse.core.config import TrialConfig

BASELINE = TrialConfig(precision="fp32", beam_width=4, threads=2)
SEARCHED = {"precision": ("fp32", "bf16", "int8"), "moe_experts": (0, 4, 8), "beam_width": (1, 2, 4, 8)}
MACHINE = {"cpu_model": "AMD EPYC 9R14", "cpu_count": 2, "threads": 2, "torch": "2.14.1",
           "torchaudio": "2.11.0", "python": "3.11.7", "platform": "Linux-6.1-x86_64"}
BASELINE_RTF = 0.30


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """One trial: knob overrides on :data:`BASELINE` and its headline numbers.

    ``wer`` is a fraction (None = not measured), ``rtf`` the normalised real-time factor,
    ``ttft_s`` in seconds, ``weight_mib`` in MiB, ``params`` the parameter count (None = not
    recorded). ``state`` FAIL/PRUNED/RUNNING trials carry ``reason`` instead of numbers.
    """
    knobs: dict
    wer: Optional[float] = None
    rtf: float = BASELINE_RTF
    ttft_s: float = 0.3
    weight_mib: float = 13.1
    params: Optional[int] = 3_400_000
    state: TrialState = TrialState.COMPLETE
    reason: str = ""
    profiled: bool = False


def config_of(spec: TrialSpec) -> dict:
    return TrialConfig.from_dict(dict(BASELINE.to_dict(), **spec.knobs)).to_dict()


def trial_attrs(spec: TrialSpec, model: dict) -> dict:
    """The ``user_attrs`` dse.run stores for a trial like ``spec`` of ``model`` ({name, weights})."""
    config = config_of(spec)
    if spec.state == TrialState.FAIL:
        return {"config": config, "fail_reason": spec.reason}
    if spec.state == TrialState.PRUNED:
        return {"config": config, "prune_reason": spec.reason}
    if spec.state == TrialState.RUNNING:
        return {"config": config}
    speedup = BASELINE_RTF / spec.rtf
    metrics = {
        "wer": spec.wer, "cer": None if spec.wer is None else spec.wer * 0.45,
        "rtf_mean": spec.rtf * 1.05, "rtf_p50": spec.rtf, "rtf_p95": spec.rtf * 1.3,
        "chunk_latency_p50_ms": spec.rtf * 160, "chunk_latency_p95_ms": spec.rtf * 210,
        "chunk_latency_p99_ms": spec.rtf * 260, "ttft_s": spec.ttft_s, "ttft_p95_s": spec.ttft_s * 1.4,
        "peak_rss_mib": 410.0 + spec.weight_mib, "weight_mib": spec.weight_mib, "params": spec.params,
        "speedup": speedup, "rtf_normalised": spec.rtf,
        "compile_s": 28.0 if config["compile"] != "off" else None, "flops_per_chunk": 1.9e8,
    }
    transcripts = [] if spec.wer is None else [
        {"id": "eval-0001", "ref": "the quick brown fox jumps over the lazy dog",
         "hyp": "the quick brown fox jumps over a lazy dog"},
        {"id": "eval-0002", "ref": "streaming speech recognition on a small cpu",
         "hyp": "streaming speech recognition on the small cpu"},
    ]
    # 50 utterances of 10 words whose errors add up to the trial's WER
    total = 0 if spec.wer is None else round(spec.wer * 500)
    utterance_errors = [] if spec.wer is None else [[total // 50 + (i < total % 50), 10] for i in range(50)]
    profile = [{"op": "aten::addmm", "self_cpu_ms": 41.2, "share": 0.46, "calls": 840},
               {"op": "aten::lstm", "self_cpu_ms": 17.9, "share": 0.2, "calls": 120},
               {"op": "aten::softmax", "self_cpu_ms": 6.1, "share": 0.07, "calls": 240}] if spec.profiled else None
    return {
        "config": config, "metrics": metrics, "machine": MACHINE,
        "phases_s": {"build": 1.2, "adapt": 30.0 if config["adapt_steps"] else 0.0, "measure": 14.5, "baseline": 6.1},
        "speedup": {"speedup": speedup, "speedup_ci95": [speedup * 0.95, speedup * 1.05], "samples": 8},
        "rtf_mean_ci95": [spec.rtf * 0.98, spec.rtf * 1.12],
        "wer_ci95": None if spec.wer is None else [spec.wer * 0.9, spec.wer * 1.1], "utterance_errors": utterance_errors,
        "wer_by_slice": {} if spec.wer is None else {"espeak": spec.wer * 0.9, "flite": spec.wer * 1.2},
        "transcripts": transcripts, "profile": profile, "adapt": None, "spread_warning": None,
        "reused_wer_from": None, "accuracy_key": TrialConfig.from_dict(config).accuracy_key(),
        "model": model,
    }


def write_study(storage_url: Optional[str], study_name: str, specs: Sequence[TrialSpec],
                objectives: Sequence[str] = ("wer", "rtf_normalised"),
                model: Optional[dict] = None) -> optuna.Study:
    """Create ``study_name`` in ``storage_url`` (None: in memory) holding one trial per spec.

    ``objectives`` are minimised; ``model`` is what dse.run records as the study's and each
    trial's model (default: a tiny checkpoint that need not exist).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_url, study_name=study_name, directions=["minimize"] * len(objectives))
    attrs = {"space": study_name, "objectives": [{"metric": m, "direction": "minimize"} for m in objectives],
             "constraints": [{"metric": "ttft_s", "max": 0.5, "min": None}],
             "baseline_config": BASELINE.to_dict(), "eval_set": "eval/manifest.jsonl",
             "model": model or {"name": "tiny", "weights": "checkpoint:tiny.pt"}}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    distributions = {knob: CategoricalDistribution(choices) for knob, choices in SEARCHED.items()}
    for spec in specs:
        attrs = trial_attrs(spec, study.user_attrs["model"])
        values = None
        if spec.state == TrialState.COMPLETE:
            values = [attrs["metrics"][m] for m in objectives]
        study.add_trial(create_trial(state=spec.state, values=values, user_attrs=attrs,
                                     params={k: attrs["config"][k] for k in SEARCHED},
                                     distributions=distributions))
    return study


DEMO_TRIALS = (
    TrialSpec({}, wer=0.20, rtf=0.30, ttft_s=0.32, weight_mib=13.1, profiled=True),  # the baseline
    TrialSpec({"precision": "int8"}, wer=0.21, rtf=0.14, ttft_s=0.20, weight_mib=3.6),
    TrialSpec({"precision": "int8", "beam_width": 1}, wer=0.24, rtf=0.09, ttft_s=0.15, weight_mib=3.6),
    TrialSpec({"precision": "int8", "moe_experts": 8, "moe_hidden": 192, "adapt_steps": 120, "beam_width": 1},
              wer=0.31, rtf=0.07, ttft_s=0.14, weight_mib=6.0),
    TrialSpec({"moe_experts": 4, "moe_top_k": 1, "moe_hidden": 384, "adapt_steps": 60},
              wer=0.26, rtf=0.27, ttft_s=0.30, weight_mib=20.0),
    TrialSpec({"precision": "bf16"}, wer=0.20, rtf=0.18, ttft_s=0.22, weight_mib=6.6),
    TrialSpec({"precision": "bf16", "beam_width": 8}, wer=0.19, rtf=0.33, ttft_s=0.40, weight_mib=6.6),
    TrialSpec({"beam_width": 2}, wer=0.205, rtf=0.22, ttft_s=0.28, weight_mib=13.1),
    TrialSpec({"precision": "int8", "moe_experts": 8, "moe_hidden": 384, "beam_width": 1},
              wer=0.55, rtf=0.08, ttft_s=0.60, weight_mib=8.0),
    TrialSpec({"precision": "int8", "moe_experts": 4, "adapt_steps": 60}, state=TrialState.FAIL,
              reason="RuntimeError: expected scalar type Float but found BFloat16"),
    TrialSpec({"moe_experts": 8, "adapt_steps": 120}, state=TrialState.PRUNED,
              reason="dev WER 0.970 at adaptation step 60 is above the space's limit 0.95"),
)
"""A small study: the fastest trial (3) has 31 % WER; within 25 % WER the fastest is trial 2;
trial 8 breaks the space's 0.5 s TTFT constraint; one trial failed and one was pruned."""

"""A trial's result as a typed record, and the one registry of metrics.

:data:`METRICS` names every metric a trial measures, with units in the names
(``_ms``, ``_s``, ``_mib``), a label and a kind for people, and whether a search space
may use it as an objective or constraint. The study, the CLI table, the dashboard,
export and verify all read metric names from here.

:class:`TrialRecord` is what one trial produced. It is written to an Optuna trial's
``user_attrs`` by :meth:`TrialRecord.to_user_attrs` and read back by
:meth:`TrialRecord.from_user_attrs` (one place each), so a stored study and a live
trial are the same record.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Metric:
    """How one metric is labelled and printed. ``kind``: ratio, percent, ms, s, mib, count, flops, factor.
    ``searchable``: a search space may name it as an objective or a constraint."""
    label: str
    kind: str
    doc: str
    missing: str = "not measured"
    searchable: bool = True


METRICS: dict[str, Metric] = {
    "wer": Metric("WER", "percent", "word errors on the eval split, from the timed pass (lower is better)"),
    "cer": Metric("CER", "percent", "character errors on the eval split"),
    "rtf_mean": Metric("RTF mean", "ratio", "compute s per audio s, mean over utterances"),
    "rtf_p50": Metric("RTF p50", "ratio", "median real-time factor over utterances"),
    "rtf_p95": Metric("RTF p95", "ratio", "95th-percentile real-time factor over utterances"),
    "rtf_normalised": Metric("RTF normalised", "ratio", "baseline's same-run RTF / same-run speedup: an RTF "
                             "comparable across a noisy study"),
    "speedup": Metric("speedup", "factor", "baseline time / this time, same run (higher is better)"),
    "inverse_speedup": Metric("1 / speedup", "ratio", "this time / baseline time, same run", searchable=False),
    "chunk_latency_p50_ms": Metric("chunk p50", "ms", "median compute time of one chunk"),
    "chunk_latency_p95_ms": Metric("chunk p95", "ms", "95th-percentile chunk compute time"),
    "chunk_latency_p99_ms": Metric("chunk p99", "ms", "99th-percentile chunk compute time"),
    "ttft_s": Metric("TTFT", "s", "median time to the first emitted token"),
    "ttft_p95_s": Metric("TTFT p95", "s", "95th-percentile time to first token"),
    "peak_rss_mib": Metric("peak RSS", "mib", "the process's peak resident memory during this trial's timed pass"),
    "rss_delta_mib": Metric("RSS growth", "mib", "resident memory the timed pass added to what was resident "
                            "before it"),
    "weight_mib": Metric("weights", "mib", "weights in their deployed form"),
    "params": Metric("parameters", "count", "parameter count"),
    "compile_s": Metric("compile time", "s", "torch.compile time before the first chunk", missing="not compiled"),
    "export_s": Metric("export time", "s", "ONNX export (and int8 quantisation) of the encoder for backend "
                       "onnxruntime, in this trial's build; 0 when the export cache held it", missing="not exported"),
    "flops_per_chunk": Metric("FLOPs per chunk", "flops", "analytic count per streaming chunk"),
    "other_cpu_load": Metric("other processes' load", "count", "cores other processes kept busy during the timed "
                             "pass (above 0.25 the timing is flagged)", searchable=False),
}

# What a search space may name (objectives and constraints), with its description.
METRIC_DOCS: dict[str, str] = {name: m.doc for name, m in METRICS.items() if m.searchable}

# The metrics a trial stores (everything but the dashboard's derived ones).
STORED_METRICS: tuple[str, ...] = tuple(name for name in METRICS if name != "inverse_speedup")


@dataclasses.dataclass
class TrialRecord:
    """Everything one trial measured. Metric names carry their units (:data:`METRICS`).

    ``speedup``: the same-run ratio against the baseline, ``{"speedup", "speedup_ci95",
    "samples"}``; ``utterance_errors``: per eval utterance ``[word errors, reference
    words]``, so two trials on one eval set compare utterance by utterance;
    ``phases_s``: wall seconds of each phase (build, adapt, export, compile, measure, baseline).
    """
    config: dict
    metrics: dict[str, Optional[float]]
    phases_s: dict[str, float] = dataclasses.field(default_factory=dict)
    speedup: dict = dataclasses.field(default_factory=dict)
    rtf_mean_ci95: Optional[list] = None
    wer_ci95: Optional[list] = None
    wer_by_slice: dict = dataclasses.field(default_factory=dict)
    utterance_errors: list = dataclasses.field(default_factory=list)
    utterances_timed: int = 0
    audio_s: float = 0.0
    spread_warning: Optional[str] = None
    load_warning: Optional[str] = None    # another process used the CPU during the timed pass
    threading: Optional[dict] = None      # threads and wait policies the pass ran with
    skipped: list = dataclasses.field(default_factory=list)
    transcripts: list = dataclasses.field(default_factory=list)
    adapt: dict = dataclasses.field(default_factory=dict)
    machine: dict = dataclasses.field(default_factory=dict)
    profile: Optional[list] = None
    # set by the study around the measurement
    accuracy_key: Optional[str] = None
    model: Optional[dict] = None
    reused_wer_from: Optional[int] = None
    constraint_violations: Optional[list] = None

    def to_user_attrs(self) -> dict[str, Any]:
        """The Optuna ``user_attrs`` of this record (JSON values; ``None`` fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_user_attrs(cls, attrs: dict) -> "TrialRecord":
        """The record a trial stored (unknown attributes, such as a failure reason, are ignored;
        missing ones take their defaults, so records of older studies read too)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in attrs.items() if k in names}
        values.setdefault("config", {})
        values.setdefault("metrics", {})
        return cls(**values)

    @classmethod
    def of_trial(cls, trial) -> "TrialRecord":
        """The record of an Optuna ``FrozenTrial``."""
        return cls.from_user_attrs(dict(trial.user_attrs))

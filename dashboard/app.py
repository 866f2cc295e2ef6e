"""Choose what to ship from a design-space study.

    streamlit run dashboard/app.py                          # studies in the default SQLite studies.db
    streamlit run dashboard/app.py -- --storage URL         # any Optuna RDB storage
    streamlit run dashboard/app.py -- --deploy-dir DIR      # where the page writes bundles (default deploy/)

The storage is, in order: ``--storage``, the ``DSE_STORAGE`` environment variable, then
:data:`dse.search.storage.DEFAULT_STORAGE`. Visitors switch among the studies in it, not to
another storage (a visitor could otherwise make the server connect anywhere), unless the
page was started with ``--allow-any-storage``. Bundles are written only under the deploy
folder, in a folder the visitor names relative to it. The server listens on 127.0.0.1 only
(``.streamlit/config.toml``); ``--server.address 0.0.0.0`` opens it to the network.

The page plots the chosen speed metric against WER (or CER) for every completed trial,
draws the Pareto front within the sidebar's limits (max WER, max TTFT, max weights),
recommends the fastest trial within them, shows any trial in detail, compares trials
and studies, ranks the knobs by importance, and exports a trial as a deployable bundle.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard import figures, logic  # noqa: E402
from dse.core.errors import DSEError, redact  # noqa: E402
from dse.core.record import TrialRecord  # noqa: E402
from dse.search.storage import DEFAULT_STORAGE  # noqa: E402

REFRESH_S = 10  # while trials run, the page checks the storage for finished trials this often (s)
CACHE_TTL_S = 600  # derived study data is kept this long (s); a changed trial count re-reads it at once


DEFAULT_DEPLOY_DIR = PROJECT_ROOT / "deploy"


def launch_options() -> argparse.Namespace:
    """What the page was started with, after ``--``: ``storage`` (else ``$DSE_STORAGE``, else the
    default SQLite file), ``deploy_dir`` (default ``deploy/`` in the project) and
    ``allow_any_storage`` (let visitors type another storage URL)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--storage")
    parser.add_argument("--deploy-dir")
    parser.add_argument("--allow-any-storage", action="store_true")
    args, _ = parser.parse_known_args(sys.argv[1:])
    args.storage = args.storage or os.environ.get("DSE_STORAGE") or DEFAULT_STORAGE
    args.deploy_dir = Path(args.deploy_dir or DEFAULT_DEPLOY_DIR).expanduser().absolute()
    return args


@st.cache_resource(show_spinner=False)
def open_storage(storage_url: str):
    """One Optuna RDB storage per URL for the whole server (read only: a read-only file is fine)."""
    from dse.search.storage import make_storage

    return make_storage(storage_url, writable=False)


@st.cache_resource(show_spinner=False)
def open_study(storage_url: str, study_name: str):
    """One Optuna study per (storage, name). Optuna caches its finished trials in memory, so
    ``get_trials`` afterwards reads only new and unfinished trials from the storage."""
    import optuna

    return optuna.load_study(study_name=study_name, storage=open_storage(storage_url))


def trial_signature(trials) -> tuple[int, int]:
    """(trials, finished trials): changes whenever a trial is added or finishes."""
    return len(trials), sum(t.state.is_finished() for t in trials)


def current_signature(storage_url: str, study_name: str) -> tuple[int, int]:
    return trial_signature(open_study(storage_url, study_name).get_trials(deepcopy=False))


@st.cache_data(ttl=CACHE_TTL_S, show_spinner="Reading the study…")
def study_snapshot(storage_url: str, study_name: str, n_trials: int, n_finished: int) -> dict:
    """Everything the page shows about one study, keyed on the storage, the name and the trial counts."""
    study = open_study(storage_url, study_name)
    trials = study.get_trials(deepcopy=False)
    attrs = dict(study.user_attrs)
    rows = logic.trial_rows(trials, study_name)
    baselines = logic.baseline_trials(rows, attrs.get("baseline_config")) if len(rows) else []
    return {
        "attrs": attrs,
        "rows": rows,
        "baselines": baselines,
        "counts": logic.count_states(trials),
        "unfinished": logic.unfinished_rows(trials, attrs.get("baseline_config")),
        # pairwise bootstrap comparisons of every trial: once per study state, not on every rerun
        "undecided": logic.undecided_trials(rows, baselines[0] if baselines else None, attrs.get("pair_speedups"))
        if len(rows) else [],
    }


@st.cache_data(ttl=CACHE_TTL_S, show_spinner="Ranking knobs…")
def importances(storage_url: str, study_name: str, n_trials: int, n_finished: int) -> dict | str:
    """Knob importance per objective, or the reason it cannot be computed."""
    study = open_study(storage_url, study_name)
    trials = study.get_trials(deepcopy=False)
    problem = logic.importance_problem(trials)
    if problem:
        return problem
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    objectives = logic.objective_metrics(study.user_attrs, len(complete[0].values))
    try:
        return logic.knob_importances(study, objectives)
    except Exception as exc:  # Optuna's evaluators refuse some trial sets; say why instead of failing the page
        return f"Knob importance could not be computed: {type(exc).__name__}: {exc}"


def load_snapshot(storage_url: str, study_name: str) -> dict:
    return study_snapshot(storage_url, study_name, *current_signature(storage_url, study_name))


def stop_with(message: str, kind: str = "info") -> None:
    """Show a message in the page and end this run of the script."""
    getattr(st, kind)(message)
    st.stop()


def choose_storage_and_study() -> tuple[str, str]:
    """Sidebar: storage URL and study; stops the page with a message when there is nothing to show."""
    st.sidebar.header("Study")
    options = launch_options()
    if options.allow_any_storage:
        storage_url = st.sidebar.text_input("Storage", value=options.storage,
                                            help="Optuna storage URL: sqlite:///path/studies.db or postgresql://…")
        storage_url = storage_url.strip()
    else:  # fixed at launch: a visitor must not make the server open files or connect elsewhere
        storage_url = options.storage
        st.sidebar.caption(f"Storage `{redact(storage_url)}` (set at launch with `-- --storage URL`)")
    missing = logic.sqlite_path_missing(storage_url)
    if missing:
        stop_with(f"No study database at `{missing}`. Run a study first, for example "
                  f"`python -m dse.run --study moe`, or start the page with `-- --storage URL` for another storage.")
    try:
        import optuna

        names = optuna.study.get_all_study_names(storage=open_storage(storage_url))
    except DSEError as exc:
        stop_with(str(exc), "error")
    except Exception as exc:
        stop_with(f"Cannot read studies from `{redact(storage_url)}`: {type(exc).__name__}: {redact(exc)}", "error")
    if not names:
        stop_with(f"The storage `{redact(storage_url)}` holds no studies yet. Run one with "
                  "`python -m dse.run --study moe` (or another space in `search_spaces/`).")
    study_name = st.sidebar.selectbox("Study", names, index=len(names) - 1,
                                      help="Studies in this storage, oldest first")
    return storage_url, study_name


def study_caption(attrs: dict, counts: logic.TrialCounts) -> str:
    """One line: the space, the model and its weights, the eval set and the trial counts."""
    model = attrs.get("model") or {}
    parts = [f"space `{attrs['space']}`" if attrs.get("space") else None,
             f"model `{model.get('name')}` ({model.get('weights')})" if model else None,
             f"eval set `{attrs['eval_set']}`" if attrs.get("eval_set") else None,
             counts.describe()]
    return " · ".join(p for p in parts if p)


def default_index(options: list, preferred: list) -> int:
    """Index in ``options`` of the first of ``preferred`` that is there (0 otherwise)."""
    return next((options.index(p) for p in preferred if p in options), 0)


def choose_axes(rows: pd.DataFrame, attrs: dict) -> tuple[str, str, str]:
    """Sidebar: x (a speed metric), y (WER or CER; speed metrics when neither was measured), colour knob."""
    st.sidebar.header("Plot")
    objectives = [o.get("metric") for o in attrs.get("objectives") or []]
    speed_options = [m for m in logic.SPEED_AXES if logic.measured(rows, m)] or list(logic.SPEED_AXES)
    x = st.sidebar.selectbox("Speed axis (x)", speed_options, format_func=logic.axis_title,
                             index=default_index(speed_options, [*objectives, "rtf_p95"]),
                             help="Lower is better. 1 / speedup and RTF normalised are ratios against the baseline "
                                  "timed in the same run, so they are comparable across a noisy study.")
    accuracy_options = [m for m in logic.ACCURACY_AXES if logic.measured(rows, m)]
    if accuracy_options:
        y = st.sidebar.radio("Accuracy axis (y)", accuracy_options, format_func=logic.axis_title, horizontal=True)
    else:
        others = [m for m in speed_options if m != x]
        y = st.sidebar.selectbox("Second axis (y)", others, format_func=logic.axis_title,
                                 index=default_index(others, objectives))
        st.sidebar.caption("WER and CER were not measured in this study (random weights), so the plot shows a "
                           "second speed metric.")
    varying = logic.varying_knobs(rows)
    knobs = varying + [k for k in logic.KNOBS if k not in varying]
    colour_by = st.sidebar.selectbox("Colour by knob", knobs, help="Knobs that vary in this study come first")
    return x, y, colour_by


def constraint_max(attrs: dict, metric: str) -> Optional[float]:
    """The study's own upper bound on ``metric`` from its search space, if it has one."""
    bounds = [c.get("max") for c in attrs.get("constraints") or [] if c.get("metric") == metric]
    bounds = [b for b in bounds if b is not None]
    return min(bounds) if bounds else None


def on_step(value: float, step: float, rounding) -> float:
    """``value`` rounded to a multiple of ``step`` by ``rounding`` (math.ceil or math.floor), ignoring
    float noise such as 55.000000001."""
    return rounding(round(value / step, 6)) * step


def limit_slider(rows: pd.DataFrame, attrs: dict, study_name: str, metric: str, label: str, unit: str,
                 scale: float, step: float) -> Optional[float]:
    """A sidebar slider for an upper bound on ``metric`` (shown in ``unit`` = stored value × ``scale``).

    The range runs from 0 to the largest measured value; it starts at the study's own constraint
    when the search space set one, else at the right end. Returns the bound in stored units, or
    None (no limit) at the right end or when no trial measured the metric.
    """
    values = rows[metric].dropna()
    if values.empty:
        st.sidebar.caption(f"{label}: not measured in this study, so no limit.")
        return None
    top = on_step(values.max() * scale, step, math.ceil) or step
    constraint = constraint_max(attrs, metric)
    start = top if constraint is None else min(top, on_step(constraint * scale, step, math.floor))
    chosen = st.sidebar.slider(f"{label} ({unit})", min_value=0.0, max_value=float(top), value=float(start),
                               step=float(step), key=f"limit:{metric}:{study_name}",
                               help="At the right end (the largest value measured) there is no limit.")
    return None if chosen >= top else chosen / scale


def choose_limits(rows: pd.DataFrame, attrs: dict, study_name: str) -> logic.Limits:
    """Sidebar sliders for max WER (%), max TTFT (s) and max weights (MiB), each with what it rules out."""
    st.sidebar.header("Limits")
    limits = logic.Limits(
        max_wer=limit_slider(rows, attrs, study_name, "wer", "Max WER", "%", 100.0, 0.5),
        max_ttft_s=limit_slider(rows, attrs, study_name, "ttft_s", "Max time to first token", "s", 1.0, 0.01),
        max_weight_mib=limit_slider(rows, attrs, study_name, "weight_mib", "Max weights", "MiB", 1.0, 1.0))
    excluded = logic.excluded_by_limit(rows, limits)
    feasible = int(logic.feasible_mask(rows, limits).sum())
    ruled_out = ", ".join(f"{logic.METRICS[m].label} {n}" for m, n in excluded.items() if n)
    st.sidebar.caption(f"{feasible} of {len(rows)} completed trials meet every limit"
                       + (f" (ruled out by {ruled_out})." if ruled_out else "."))
    return limits


def show_recommendation(rows: pd.DataFrame, x: str, y: str, limits: logic.Limits, recommended: Optional[int],
                        baselines: list[int], baseline_config: Optional[dict],
                        pair_speedups: Optional[dict] = None) -> None:
    """The trial to ship, with its key numbers against the baseline trial (when the study has one).
    The recommendation is never a trial the baseline dominates; when nothing beats the baseline
    within the limits, the page says so and recommends the baseline."""
    if recommended is None:
        bounds = ", ".join(f"{logic.METRICS[metric].label} ≤ {logic.format_metric(metric, bound)}"
                           for metric, bound in limits.bounds().items())
        st.markdown("### No trial meets the limits")
        st.warning(f"No completed trial with a measured {logic.METRICS[x].label} has {bounds}. "
                   "Loosen a limit in the sidebar." if bounds else
                   f"No completed trial has a measured {logic.METRICS[x].label}; choose another speed axis.")
        return
    row = rows.set_index("trial").loc[recommended]
    base = rows.set_index("trial").loc[baselines[0]] if baselines else None
    if baselines and recommended == baselines[0]:
        st.markdown(f"### Recommended: trial {recommended} (the baseline)")
        st.info("No configuration beats the baseline within the limits: none is faster than it beyond the "
                "timing noise without the baseline dominating it. Ship the baseline, or loosen a limit.")
    else:
        st.markdown(f"### Recommended: trial {recommended}")
        if baselines:
            st.markdown(logic.against_baseline(rows, recommended, baselines[0], pair_speedups) + ".")
    st.caption(f"Lowest {logic.METRICS[x].label} within the limits among the trials that beat the baseline "
               "beyond the noise (ties go to the lower WER). "
               f"Changes from the baseline: {logic.describe_changes(row['config'], baseline_config)}.")
    shown = list(dict.fromkeys([x, y, "wer", "speedup", "ttft_s", "weight_mib"]))
    for column, metric in zip(st.columns(len(shown)), shown):
        delta = None
        if base is not None and recommended not in baselines and metric != "speedup":  # speedup is already relative
            delta = logic.change_from(metric, row[metric], base[metric])
        column.metric(logic.METRICS[metric].label, logic.format_metric(metric, row[metric]),
                      delta=f"{delta} vs baseline" if delta else None, delta_color="inverse")  # lower is better


def front_table(front: pd.DataFrame, x: str, y: str, baseline_config: Optional[dict]) -> pd.DataFrame:
    """The feasible front as a table for people, ordered from fastest to most accurate."""
    shown = list(dict.fromkeys([x, y, "ttft_s", "weight_mib", "speedup"]))
    table = pd.DataFrame({"trial": front["trial"],
                          "changes from the baseline": [logic.describe_changes(c, baseline_config)
                                                        for c in front["config"]]})
    for metric in shown:
        table[logic.METRICS[metric].label] = [logic.format_metric(metric, v) for v in front[metric]]
    return table


def show_plot(rows: pd.DataFrame, counts: logic.TrialCounts, x: str, y: str, colour_by: str,
              limits: logic.Limits, recommended: Optional[int], baselines: list[int],
              undecided: Sequence[int] = ()) -> Optional[int]:
    """The front plot with its legend in words; returns the trial clicked in the plot, if any."""
    fig = figures.front_figure(rows, x, y, colour_by, limits, recommended, baselines, undecided=undecided)
    event = st.plotly_chart(fig, key="front_plot", on_select="rerun", selection_mode="points",
                            config={"displaylogo": False})
    not_plotted = int((rows[x].isna() | rows[y].isna()).sum())
    notes = ["Solid points joined by the staircase: the Pareto front within the limits (nothing is both faster "
             "and more accurate). Faded: dominated. Hollow: outside the limits. ★ recommended, ◇ baseline. "
             "Bars: 95 % intervals (WER over utterances; speed from the same-run ratio against the baseline). "
             "Ringed: another trial looks better on both axes but not beyond the noise (undecided). "
             "Click a point to inspect it."]
    if counts.failed or counts.pruned:
        notes.append(f"{counts.failed} failed and {counts.pruned} pruned trials are not plotted "
                     "(see the Failed & pruned tab).")
    busy = [int(n) for n, a in zip(rows["trial"], rows["attrs"]) if TrialRecord.from_user_attrs(a).load_warning]
    if busy:
        notes.append(f"⚠ The machine was busy while trial(s) {', '.join(map(str, busy))} were timed: another process "
                     "used the CPU, so their speeds may be far off. Stop other work and measure them again.")
    if not_plotted:
        notes.append(f"{not_plotted} completed trial(s) without a measured {logic.METRICS[x].label} or "
                     f"{logic.METRICS[y].label} are not plotted.")
    st.caption(" ".join(notes))
    points = (getattr(getattr(event, "selection", None), "points", None) or []) if event else []
    clicked = [p.get("customdata") for p in points if isinstance(p.get("customdata"), (int, float))]
    return int(clicked[0]) if clicked else None


def export_bundle_ui(storage_url: str, study_name: str, trial: int) -> None:
    """Folder input and export button; the bundle is written by :func:`dse.deploy.export.export_bundle`
    into a folder under the deploy folder set at launch, never elsewhere."""
    deploy_dir = launch_options().deploy_dir
    folder_column, button_column = st.columns([4, 1], vertical_alignment="bottom")
    name = folder_column.text_input("Output folder", value=f"{study_name}-trial{trial}",
                                    help=f"A folder name, written under {deploy_dir} (set at launch with "
                                         "`-- --deploy-dir DIR`); absolute paths and '..' are refused")
    clicked = button_column.button(f"Export trial {trial}", type="primary", width="stretch")
    replace = st.checkbox("Replace the folder if it holds an earlier bundle", value=False,
                          help="Only a folder holding a dse bundle, and nothing else, is ever replaced")
    if not clicked:
        return
    try:
        from dse.deploy.export import bundle_path, export_bundle
    except ImportError as exc:
        st.error(f"Export is not available in this installation of dse: {exc}")
        return
    try:
        out_dir = bundle_path(deploy_dir, name)
    except DSEError as exc:
        st.error(f"Export refused: {exc}")
        return
    with st.status(f"Exporting trial {trial}: rebuilding its model and writing the bundle…") as progress:
        try:
            path = export_bundle(storage_url, study_name, out_dir, trial=trial, force=replace, log=progress.write)
        except Exception as exc:  # shown to the person, not as a traceback
            progress.update(label=f"Export of trial {trial} failed", state="error")
            st.error(f"Export failed: {redact(exc)}" if isinstance(exc, DSEError) else
                     f"Export failed: {type(exc).__name__}: {redact(exc)}")
            return
        progress.update(label=f"Exported trial {trial}", state="complete", expanded=False)
    st.success(f"Bundle written to `{Path(path).resolve()}`")


def share_table(records: list[dict], share_label: str) -> None:
    """A table whose ``share`` column (0..1) is drawn as a bar."""
    st.dataframe(pd.DataFrame(records), hide_index=True, width="stretch",
                 column_config={"share": st.column_config.ProgressColumn(share_label, min_value=0.0, max_value=1.0,
                                                                         format="percent")})


def show_trial_detail(rows: pd.DataFrame, trial: int, baseline_config: Optional[dict]) -> None:
    """Configuration, metrics with units, phases, machine, operators, slices and transcripts of one trial."""
    row = rows.set_index("trial").loc[trial]
    record = TrialRecord.from_user_attrs(row["attrs"])
    if record.spread_warning:
        st.warning(f"Timing spread: {record.spread_warning}")
    if record.load_warning:
        st.warning(f"Machine not quiet: {record.load_warning}")
    if record.reused_wer_from is not None:
        st.caption(f"WER and CER reused from trial {record.reused_wer_from} (same accuracy-relevant knobs); "
                   "this trial streamed only its timing utterances.")
    config_column, metric_column = st.columns([5, 7])
    with config_column:
        st.markdown("**Configuration** (changed knobs are ticked)")
        st.dataframe(logic.config_table(row["config"], baseline_config), hide_index=True, width="stretch",
                     height="content")
    with metric_column:
        st.markdown("**Metrics**")
        st.dataframe(logic.metric_table(record.metrics or {}), hide_index=True, width="stretch",
                     height="content")
        ci = record.rtf_mean_ci95
        speedup = record.speedup or {}
        notes = []
        if ci:
            notes.append(f"RTF mean 95 % interval [{ci[0]:.4f}, {ci[1]:.4f}]")
        if speedup.get("speedup_ci95"):
            lo, hi = speedup["speedup_ci95"]
            notes.append(f"speedup 95 % interval [{lo:.2f}×, {hi:.2f}×] over {speedup.get('samples')} utterances")
        if notes:
            st.caption("; ".join(notes) + ".")

    phase_column, machine_column = st.columns(2)
    with phase_column:
        st.markdown("**Phase durations**")
        phases = record.phases_s or {}
        total_s = sum(phases.values()) or 1.0
        if phases:
            share_table([{"phase": name, "seconds": round(s, 2), "share": s / total_s} for name, s in phases.items()],
                        "share of the trial")
        else:
            st.caption("No phase durations recorded.")
    with machine_column:
        st.markdown("**Machine**")
        machine = record.machine or {}
        st.dataframe(pd.DataFrame({"": list(machine), "value": [str(v) for v in machine.values()]}),
                     hide_index=True, width="stretch")

    st.markdown("**Operator breakdown**")
    profile = record.profile
    if profile:
        share_table([{"operator": p["op"], "self CPU (ms)": round(p["self_cpu_ms"], 2), "calls": p["calls"],
                      "share": p["share"]} for p in profile], "share of self CPU time")
    else:
        st.caption("Not profiled. Run the study with `--profile` to record the operators that take the time.")

    by_slice = record.wer_by_slice or {}
    if by_slice:
        st.markdown("**WER by slice**")
        st.dataframe(pd.DataFrame({"slice": list(by_slice),
                                   "WER": [logic.format_metric("wer", v) for v in by_slice.values()]}),
                     hide_index=True, width="content")

    st.markdown("**Transcripts**")
    transcripts = logic.transcript_table(record.transcripts or [])
    if transcripts.empty:
        st.caption("No transcripts stored (WER not measured, or reused from another trial).")
    else:
        st.dataframe(transcripts, hide_index=True, width="stretch", height="content",
                     column_config={"WER": st.column_config.NumberColumn("WER", format="percent")})
    if record.adapt:
        with st.expander("Adaptation"):
            st.json(record.adapt)


def show_compare_trials(rows: pd.DataFrame, preselected: list[int]) -> None:
    numbers = rows["trial"].tolist()
    picked = st.multiselect("Trials to compare", numbers, default=[n for n in preselected if n in numbers][:2],
                            format_func=lambda n: f"trial {n}")
    if len(picked) < 2:
        st.info("Pick two or more trials to see them side by side.")
        return
    table = logic.side_by_side(rows, picked)
    only_differences = st.toggle("Only rows that differ", value=True)
    if only_differences:
        table = table[table["differs"]]
    st.dataframe(table.drop(columns="differs"), hide_index=True, width="stretch", height="content")
    for n in picked[1:]:
        line = logic.wer_difference(rows, n, picked[0])
        if line:
            st.caption(line)


def show_compare_studies(storage_url: str, study_name: str, x: str, y: str) -> None:
    import optuna

    names = optuna.study.get_all_study_names(storage=open_storage(storage_url))
    picked = st.multiselect("Studies to compare", names, default=[study_name],
                            help="Same axes as the main plot, one colour per study")
    if len(picked) < 2:
        st.info("Pick two or more studies from this storage to plot them together.")
        return
    rows = pd.concat([load_snapshot(storage_url, name)["rows"] for name in picked], ignore_index=True)
    if rows[[x, y]].dropna().empty:
        st.info(f"None of these studies measured both {logic.METRICS[x].label} and {logic.METRICS[y].label}.")
        return
    st.plotly_chart(figures.studies_figure(rows, x, y), key="studies_plot", config={"displaylogo": False})
    st.caption("Speedups and normalised RTFs are against each study's own baseline; absolute times are only "
               "comparable when the studies ran on the same machine (see each trial's machine fingerprint).")


def show_importance(storage_url: str, study_name: str) -> None:
    result = importances(storage_url, study_name, *current_signature(storage_url, study_name))
    if isinstance(result, str):
        st.info(result)
        return
    st.plotly_chart(figures.importance_figure(result), key="importance_plot", config={"displaylogo": False})
    st.caption("How much each searched knob decides whether a trial reaches low values of each objective "
               "(Optuna's PED-ANOVA over the completed trials; shares sum to 100 % per objective).")


@st.fragment(run_every=REFRESH_S)
def watch_running_trials(storage_url: str, study_name: str, shown_signature: tuple[int, int]) -> None:
    """Re-draw the whole page as soon as a trial is added or finishes."""
    if current_signature(storage_url, study_name) != shown_signature:
        st.rerun(scope="app")
    st.caption(f"Trials are running: checking for results every {REFRESH_S} s "
               f"(last check {datetime.now():%H:%M:%S}).")


def main() -> None:
    st.set_page_config(page_title="DSE study", page_icon="📈", layout="wide")
    storage_url, study_name = choose_storage_and_study()
    try:
        signature = current_signature(storage_url, study_name)
        snapshot = study_snapshot(storage_url, study_name, *signature)
    except Exception as exc:
        stop_with(f"Cannot read study `{study_name}` from `{redact(storage_url)}`: {type(exc).__name__}: "
                  f"{redact(exc)}", "error")
    attrs, rows, counts = snapshot["attrs"], snapshot["rows"], snapshot["counts"]

    st.title(f"Study {study_name}")
    st.caption(study_caption(attrs, counts))
    if counts.running or counts.waiting:
        st.info(f"{counts.running + counts.waiting} trial(s) still running: the page updates when they finish.")
        watch_running_trials(storage_url, study_name, signature)
    if rows.empty:
        unfinished = snapshot["unfinished"]
        if unfinished.empty:
            stop_with(f"Study `{study_name}` has no trials yet.")
        st.warning(f"Study `{study_name}` has no completed trials yet ({counts.describe()}). "
                   "The trials so far and their reasons:")
        st.dataframe(unfinished, hide_index=True, width="stretch")
        st.stop()

    x, y, colour_by = choose_axes(rows, attrs)
    limits = choose_limits(rows, attrs, study_name)
    baseline_config = attrs.get("baseline_config")
    baselines = snapshot["baselines"]
    pair_speedups = attrs.get("pair_speedups")
    recommended = logic.recommend(rows, x, limits, baselines, pair_speedups)

    show_recommendation(rows, x, y, limits, recommended, baselines, baseline_config, pair_speedups)
    undecided = snapshot["undecided"]
    clicked = show_plot(rows, counts, x, y, colour_by, limits, recommended, baselines, undecided)

    front = logic.pareto_front(rows[logic.feasible_mask(rows, limits)], x, y)
    with st.expander(f"Pareto front within the limits: {len(front)} trial(s)", expanded=True):
        st.dataframe(front_table(front, x, y, baseline_config), hide_index=True, width="stretch")

    st.markdown("### Inspect and export")
    numbers = rows["trial"].tolist()
    preferred = [n for n in (clicked, recommended) if n is not None]
    selected = st.selectbox("Trial", numbers, index=default_index(numbers, preferred),
                            format_func=lambda n: f"trial {n}" + (" (recommended)" if n == recommended else "")
                            + (" (baseline)" if n in baselines else ""))
    export_bundle_ui(storage_url, study_name, selected)

    unfinished = snapshot["unfinished"]
    detail, compare_trials, compare_studies, importance, problems = st.tabs(
        [f"Trial {selected}", "Compare trials", "Compare studies", "Knob importance",
         f"Failed & pruned{' & running' if counts.running + counts.waiting else ''} ({len(unfinished)})"])
    with detail:
        show_trial_detail(rows, selected, baseline_config)
    with compare_trials:
        show_compare_trials(rows, list(dict.fromkeys([selected, *baselines, *front["trial"].tolist()])))
    with compare_studies:
        show_compare_studies(storage_url, study_name, x, y)
    with importance:
        show_importance(storage_url, study_name)
    with problems:
        if unfinished.empty:
            st.caption("No failed, pruned or running trials.")
        else:
            st.dataframe(unfinished, hide_index=True, width="stretch")


main()

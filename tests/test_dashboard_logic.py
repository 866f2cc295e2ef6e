import pytest
from optuna.trial import TrialState

pytest.importorskip("pandas", reason="the dashboard needs pandas (pip install -e '.[dashboard]')")
from dashboard import logic  # noqa: E402
from dashboard_study import DEMO_TRIALS, TrialSpec, write_study  # noqa: E402

NAN = float("nan")


def rows_of(specs, **kwargs):
    """Rows of an in-memory study holding ``specs``."""
    return logic.trial_rows(write_study(None, "study", specs, **kwargs).get_trials(), "study")


@pytest.fixture(scope="module")
def demo():
    return write_study(None, "demo", DEMO_TRIALS)


def test_pareto_mask_of_known_points():
    x = [1.0, 2.0, 3.0, 4.0, 2.0, 5.0, NAN, 1.0, 4.0]
    y = [5.0, 3.0, 4.0, 1.0, 3.0, 5.0, 0.5, 6.0, None]
    # (2, 3) twice: duplicates of a front point are both on it; (1, 6) loses to (1, 5) at the same x;
    # points with a missing coordinate are never on the front.
    assert logic.pareto_mask(x, y) == [True, True, False, True, True, False, False, False, False]


def test_pareto_mask_edge_cases():
    assert logic.pareto_mask([], []) == []
    assert logic.pareto_mask([3.0], [3.0]) == [True]
    assert logic.pareto_mask([1.0, 1.0], [2.0, 2.0]) == [True, True]


def test_pareto_front_follows_the_chosen_axes(demo):
    rows = logic.trial_rows(demo.get_trials(), "demo")
    by_rtf = logic.pareto_front(rows, "rtf_normalised", "wer")
    assert by_rtf["trial"].tolist() == [3, 2, 1, 5, 6]  # ordered from fastest to most accurate
    by_weight = logic.pareto_front(rows, "weight_mib", "wer")
    assert by_weight["trial"].tolist() == [1, 6]  # trial 6 beats 5 at the same weight


def test_limits_filter_rows_and_treat_not_measured_as_failing():
    rows = rows_of([TrialSpec({}, wer=0.2, ttft_s=0.3, weight_mib=13.0),
                    TrialSpec({"precision": "int8"}, wer=None, ttft_s=0.2, weight_mib=4.0),
                    TrialSpec({"beam_width": 1}, wer=0.4, ttft_s=0.6, weight_mib=13.0)],
                   objectives=("rtf_normalised",))
    assert logic.feasible_mask(rows, logic.Limits()).tolist() == [True, True, True]
    assert logic.feasible_mask(rows, logic.Limits(max_wer=0.3)).tolist() == [True, False, False]
    assert logic.feasible_mask(rows, logic.Limits(max_ttft_s=0.5)).tolist() == [True, True, False]
    assert logic.feasible_mask(rows, logic.Limits(max_weight_mib=5.0)).tolist() == [False, True, False]
    assert logic.excluded_by_limit(rows, logic.Limits(max_wer=0.3, max_ttft_s=0.5)) == {"wer": 2, "ttft_s": 1}


def test_moving_the_wer_limit_changes_the_recommendation(demo):
    rows = logic.trial_rows(demo.get_trials(), "demo")
    assert logic.recommend(rows, "rtf_normalised", logic.Limits()) == 3
    assert logic.recommend(rows, "rtf_normalised", logic.Limits(max_wer=0.25)) == 2
    assert logic.recommend(rows, "rtf_normalised", logic.Limits(max_wer=0.2)) == 5
    assert logic.recommend(rows, "rtf_normalised", logic.Limits(max_wer=0.1)) is None
    # trial 8 is faster than 2 but breaks the TTFT limit
    assert logic.recommend(rows, "rtf_normalised", logic.Limits(max_wer=0.6, max_ttft_s=0.5)) == 3
    assert logic.recommend(rows, "weight_mib", logic.Limits(max_wer=0.22)) == 1


def test_recommendation_ties_go_to_the_lower_wer_then_the_lower_trial():
    rows = rows_of([TrialSpec({}, wer=0.3, rtf=0.1), TrialSpec({"beam_width": 8}, wer=0.2, rtf=0.1),
                    TrialSpec({"beam_width": 1}, wer=0.2, rtf=0.1),
                    TrialSpec({"precision": "bf16"}, wer=None, rtf=0.1)], objectives=("rtf_normalised",))
    assert logic.recommend(rows, "rtf_normalised", logic.Limits()) == 1


def test_counts_of_each_state(demo):
    counts = logic.count_states(demo.get_trials())
    assert counts == logic.TrialCounts(complete=9, pruned=1, failed=1)
    assert counts.describe() == "11 trials: 9 complete, 1 pruned, 1 failed"
    running = write_study(None, "running", [DEMO_TRIALS[0], TrialSpec({}, state=TrialState.RUNNING)])
    assert logic.count_states(running.get_trials()).running == 1


def test_unfinished_trials_carry_their_reason(demo):
    table = logic.unfinished_rows(demo.get_trials(), demo.user_attrs["baseline_config"])
    assert table["state"].tolist() == ["FAIL", "PRUNED"]
    assert table["reason"].iloc[0].startswith("RuntimeError")
    assert "above the space's limit" in table["reason"].iloc[1]
    assert table["configuration"].iloc[1] == "moe_experts=8, adapt_steps=120"


def test_not_measured_wer_is_never_a_number():
    rows = rows_of([TrialSpec({}, wer=None, rtf=0.3), TrialSpec({"precision": "int8"}, wer=None, rtf=0.1)],
                   objectives=("rtf_p95", "ttft_s"))
    assert rows["wer"].isna().all() and not logic.measured(rows, "wer")
    assert logic.format_metric("wer", rows["wer"].iloc[0]) == "not measured"
    assert logic.format_metric("cer", None) == "not measured"
    assert "WER: not measured" in logic.hover_text(rows.iloc[0])
    table = logic.metric_table(rows["attrs"].iloc[0]["metrics"])
    assert table.set_index("metric").at["WER", "value"] == "not measured"
    assert logic.pareto_front(rows, "rtf_p95", "wer").empty
    assert logic.recommend(rows, "rtf_p95", logic.Limits()) == 1
    assert logic.recommend(rows, "rtf_p95", logic.Limits(max_wer=0.5)) is None


def test_rows_keep_knob_values_and_derive_inverse_speedup(demo):
    rows = logic.trial_rows(demo.get_trials(), "demo")
    assert len(rows) == 9 and rows["trial"].tolist() == list(range(9))
    assert rows.at[0, "right_context_frames"] is None and rows.at[3, "moe_experts"] == 8
    assert rows.at[2, "inverse_speedup"] == pytest.approx(1 / rows.at[2, "speedup"])
    assert logic.varying_knobs(rows) == ["precision", "moe_experts", "moe_top_k", "moe_hidden", "beam_width",
                                         "adapt_steps"]


def test_baseline_marker_is_the_trial_with_the_baseline_config(demo):
    rows = logic.trial_rows(demo.get_trials(), "demo")
    assert logic.baseline_trials(rows, demo.user_attrs["baseline_config"]) == [0]
    assert logic.baseline_trials(rows, dict(demo.user_attrs["baseline_config"], beam_width=16)) == []
    assert logic.baseline_trials(rows, None) == []


def test_formatting_has_units():
    assert logic.format_metric("wer", 0.123) == "12.3 %"
    assert logic.format_metric("chunk_latency_p95_ms", 41.25) == "41.2 ms"
    assert logic.format_metric("ttft_s", 0.2) == "0.200 s"
    assert logic.format_metric("weight_mib", 3.6) == "3.6 MiB"
    assert logic.format_metric("compile_s", None) == "not compiled"
    assert logic.axis_title("chunk_latency_p95_ms") == "chunk p95 (ms)"
    assert logic.change_from("wer", 0.31, 0.20) == "+11.0 pts"
    assert logic.change_from("rtf_p95", 0.07, 0.28) == "-75%"
    assert logic.format_knob("segment_frames", None) == "as trained"


def test_side_by_side_flags_differences(demo):
    rows = logic.trial_rows(demo.get_trials(), "demo")
    table = logic.side_by_side(rows, [0, 2]).set_index("")
    assert table.at["precision", "trial 0"] == "fp32" and table.at["precision", "trial 2"] == "int8"
    assert table.at["precision", "differs"] and not table.at["threads", "differs"]


def test_transcripts_get_their_own_wer():
    table = logic.transcript_table([{"id": "a", "ref": "one two three four", "hyp": "one two tree four"}])
    assert table.at[0, "WER"] == pytest.approx(0.25)


def test_importance_needs_two_varying_completed_trials(demo):
    assert "at least 2 completed" in logic.importance_problem(write_study(None, "one", DEMO_TRIALS[:1]).get_trials())
    same = write_study(None, "same", [DEMO_TRIALS[0], DEMO_TRIALS[0]])
    assert "varies" in logic.importance_problem(same.get_trials())
    assert logic.importance_problem(demo.get_trials()) is None
    result = logic.knob_importances(demo, ["wer", "rtf_normalised"])
    assert set(result) == {"wer", "rtf_normalised"}
    assert sum(result["wer"].values()) == pytest.approx(1.0)


def test_missing_sqlite_file_is_detected(tmp_path):
    assert logic.sqlite_path_missing(f"sqlite:///{tmp_path}/none.db") == f"{tmp_path}/none.db"
    (tmp_path / "there.db").touch()
    assert logic.sqlite_path_missing(f"sqlite:///{tmp_path}/there.db") is None
    assert logic.sqlite_path_missing("postgresql://user@host/db") is None
    assert logic.sqlite_path_missing("sqlite:///:memory:") is None


def test_wer_difference_is_paired_and_says_when_the_set_cannot_tell():
    import pandas as pd

    base = [[i % 3, 6] for i in range(60)]
    worse = [[e + 1, w] for e, w in base]
    moved = [[base[(i + 1) % 60][0], 6] for i in range(60)]
    rows = pd.DataFrame({"trial": [0, 1, 2, 3, 4],
                         "attrs": [{"utterance_errors": base}, {"utterance_errors": worse},
                                   {"utterance_errors": moved}, {}, {"utterance_errors": base[:30]}]})
    line = logic.wer_difference(rows, 1, 0)
    assert "+16.7 points" in line and "trial 1 is worse" in line and "60 utterances" in line
    assert "does not tell them apart" in logic.wer_difference(rows, 2, 0)
    # no per-utterance errors, or another set of utterances: nothing to say
    assert logic.wer_difference(rows, 3, 0) is None and logic.wer_difference(rows, 4, 0) is None

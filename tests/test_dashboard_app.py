"""The Streamlit page, run in-process by Streamlit's AppTest against real SQLite studies."""
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard_study import DEMO_TRIALS, TrialSpec, write_study  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def run_page(monkeypatch, storage_url: str) -> AppTest:
    monkeypatch.setenv("DSE_STORAGE", storage_url)
    page = AppTest.from_file(APP, default_timeout=60)
    page.run()
    assert not page.exception, page.exception
    return page


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def recommendation(page: AppTest) -> str:
    return next(m for m in texts(page.markdown) if m.startswith("### "))


@pytest.fixture
def demo_storage(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    write_study(url, "moe-demo", DEMO_TRIALS)
    return url


def test_page_recommends_within_the_limits(monkeypatch, demo_storage):
    page = run_page(monkeypatch, demo_storage)
    assert texts(page.title) == ["Study moe-demo"]
    assert "11 trials: 9 complete, 1 pruned, 1 failed" in page.caption[0].value
    assert len(page.get("plotly_chart")) >= 2  # the front and the knob importances
    assert recommendation(page) == "### Recommended: trial 3"
    assert any("1 failed and 1 pruned trials are not plotted" in c for c in texts(page.caption))
    # the space's own TTFT constraint (0.5 s) is the slider's starting point
    assert page.slider(key="limit:ttft_s:moe-demo").value == 0.5

    page.slider(key="limit:wer:moe-demo").set_value(25.0).run()
    assert not page.exception
    assert recommendation(page) == "### Recommended: trial 2"
    page.slider(key="limit:wer:moe-demo").set_value(5.0).run()
    assert recommendation(page) == "### No trial meets the limits"
    assert "Loosen a limit" in page.warning[0].value


def test_page_shows_a_trial_in_detail(monkeypatch, demo_storage):
    page = run_page(monkeypatch, demo_storage)
    trial_picker = next(s for s in page.selectbox if s.label == "Trial")
    trial_picker.set_value(0).run()  # trial 0, the baseline, was profiled
    assert not page.exception
    markdown = texts(page.markdown)
    for heading in ("**Metrics**", "**Phase durations**", "**Machine**", "**Operator breakdown**", "**Transcripts**"):
        assert heading in markdown
    assert not any(c.startswith("Not profiled") for c in texts(page.caption))
    assert page.button[0].label == "Export trial 0"


def test_trial_comparison_says_whether_the_wer_gap_is_beyond_noise(monkeypatch, demo_storage):
    page = run_page(monkeypatch, demo_storage)
    trials = next(m for m in page.multiselect if m.label == "Trials to compare")
    trials.set_value([0, 3]).run()
    assert not page.exception
    # trial 3 has one or two more errors than trial 0 in every one of the 50 utterances
    line = next(c for c in texts(page.caption) if c.startswith("trial 3 vs trial 0"))
    assert "WER +11.0 points" in line and "paired over 50 utterances" in line and line.endswith("trial 3 is worse")


def test_page_compares_studies(monkeypatch, demo_storage):
    write_study(demo_storage, "int8-only", [s for s in DEMO_TRIALS if s.knobs.get("precision") == "int8"])
    page = run_page(monkeypatch, demo_storage)
    assert page.sidebar.selectbox[0].value == "int8-only"  # the newest study first
    page.sidebar.selectbox[0].set_value("moe-demo").run()
    studies = next(m for m in page.multiselect if m.label == "Studies to compare")
    studies.set_value(["moe-demo", "int8-only"]).run()
    assert not page.exception
    assert len(page.get("plotly_chart")) == 3


def test_random_weight_study_says_not_measured(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    write_study(url, "base-latency", [TrialSpec({}, rtf=0.5, ttft_s=0.4),
                                      TrialSpec({"precision": "int8"}, rtf=0.2, ttft_s=0.3)],
                objectives=("rtf_p95", "ttft_s"))
    page = run_page(monkeypatch, url)
    assert recommendation(page) == "### Recommended: trial 1"
    assert any("not measured" in c for c in texts(page.sidebar.caption))
    metrics = next(d.value for d in page.dataframe if "metric" in d.value.columns)
    assert metrics.set_index("metric").at["WER", "value"] == "not measured"


def empty_storage(url: str) -> None:
    optuna.storages.RDBStorage(url)


def failed_only(url: str) -> None:
    write_study(url, "broken", [s for s in DEMO_TRIALS if s.state != TrialState.COMPLETE])


def still_running(url: str) -> None:
    write_study(url, "running", [*DEMO_TRIALS[:3], TrialSpec({"beam_width": 8}, state=TrialState.RUNNING)])


@pytest.mark.parametrize("make_storage, kind, message", [
    (None, "info", "No study database at"),
    (empty_storage, "info", "holds no studies yet"),
    (failed_only, "warning", "has no completed trials yet"),
    (still_running, "info", "1 trial(s) still running"),
])
def test_page_explains_storages_without_results(monkeypatch, tmp_path, make_storage, kind, message):
    path = tmp_path / "studies.db"
    url = f"sqlite:///{path}"
    if make_storage:
        make_storage(url)
    page = run_page(monkeypatch, url)
    assert any(message in text for text in texts(getattr(page, kind))), texts(getattr(page, kind))
    assert path.exists() == (make_storage is not None)  # a missing database is reported, never created

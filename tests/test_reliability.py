"""What the commands do when something is wrong: a bad storage, a one-utterance eval set, bad
audio among good, a bundle from a newer dse, a subset verified, a folder that is not a bundle, a
dashboard visitor asking for files or storages it must not touch.

The commands run as subprocesses (``python -m dse.<cmd>``), as a user runs them: each case checks
the exit status, the message, and that nothing was written or half-written.
"""
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Optional

import optuna
import pytest
import soundfile
import yaml

from conftest import tone
from test_export import SPACE, copy_bundle, rewrite_manifest_line
from dse import run
from dse.core import measure, models
from dse.core.errors import DSEError
from dse.deploy import export
from dse.search import storage as storage_module

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "secretpw"
UNREACHABLE = f"postgresql://u:{PASSWORD}@127.0.0.1:1/x"  # port 1: refused at once
# Seven utterances: the last two are scored against the transcripts the model gives them, so the
# WER of the first five (1.0) differs from the whole set's.
TEXTS = ["hello world", "one", "the cat sat on the mat today", "go", "a b c d e f g h", "yes", "no"]
MATCHED = (5, 6)


def cli(cmd: str, *args, cwd: Path, stdin: bytes = b"", timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m dse.<cmd> ARGS`` in ``cwd`` with this checkout first on the path; text output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("DSE_STORAGE", None)
    out = subprocess.run([sys.executable, "-m", f"dse.{cmd}", *map(str, args)], cwd=cwd, env=env, input=stdin,
                         capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line a failed command prints on stderr (no traceback)."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def tree(path: Path) -> dict:
    """Every file under ``path`` with its SHA-256: equal before and after means nothing was written."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def write_eval_set(root: Path, texts: list[str]) -> Path:
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(texts):
        seconds = 0.6 + 0.2 * i
        soundfile.write(root / "audio" / f"u{i}.wav", tone(seconds, freq=180 + 40 * i, seed=i), 16000)
        rows.append({"path": f"audio/u{i}.wav", "duration": seconds, "text": text})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def run_study(root: Path, checkpoint: Path, manifest: Path) -> optuna.trial.FrozenTrial:
    """One fp32 trial of ``checkpoint`` on ``manifest`` (test_export's space), in ``root/s.db``."""
    space = root / "space.yaml"
    space.write_text(SPACE.format(checkpoint=checkpoint, n_trials=1, params="{precision: {choices: [fp32]}}"))
    storage = f"sqlite:///{root / 's.db'}"
    assert run.main(["--study", str(space), "--storage", storage, "--eval-set", str(manifest),
                     "--model", str(checkpoint)]) == 0
    (trial,) = optuna.load_study(study_name="space", storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    return trial


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A one-trial study of a tiny checkpoint on seven utterances, and its exported bundle."""
    root = tmp_path_factory.mktemp("reliability")
    checkpoint = root / "tiny.pt"
    models.save_checkpoint(checkpoint, models.random_model("tiny"))
    # a first run learns what the model says, so that two references can be exactly that
    first = run_study(root / "probe", checkpoint, write_eval_set(root / "probe", TEXTS))
    texts = [t["hyp"] if i in MATCHED else TEXTS[i] for i, t in enumerate(first.user_attrs["transcripts"])]
    manifest = write_eval_set(root, texts)
    trial = run_study(root, checkpoint, manifest)
    bundle = export.export_bundle(f"sqlite:///{root / 's.db'}", "space", root / "bundle", trial=trial.number)
    return types.SimpleNamespace(root=root, storage=f"sqlite:///{root / 's.db'}", trial=trial, bundle=bundle,
                                 manifest=manifest, checkpoint=checkpoint,
                                 audio=[root / "audio" / f"u{i}.wav" for i in range(len(TEXTS))])


# -- 1. storage URLs: passwords never printed, postgres:// explained -------------------------
@pytest.mark.parametrize("cmd, args", [
    ("run", ["--study", "precision"]),
    ("export", ["--study", "space", "--trial", "0", "--out", "out"]),
])
def test_unreachable_storage_is_one_line_without_the_password(tmp_path, cmd, args):
    out = cli(cmd, *args, "--storage", UNREACHABLE, cwd=tmp_path)
    assert out.returncode == 2
    assert PASSWORD not in out.stdout + out.stderr
    line = one_error_line(out)
    assert "postgresql://u:***@127.0.0.1:1/x" in line and "OperationalError" in line
    assert list(tmp_path.iterdir()) == []


def test_password_in_driver_text_is_masked_even_outside_a_url():
    url = "postgresql://u:p%2Fss-word@db/x"  # the password 'p/ss-word', percent-encoded in the URL
    error = storage_module.storage_error(url, RuntimeError("auth failed for 'p/ss-word' (p%2Fss-word) at " + url))
    assert "ss-word" not in str(error) and "postgresql://u:***@db/x" in str(error)


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://127.0.0.1:1/x?user=u&password={PASSWORD}", "postgresql://127.0.0.1:1/x?user=u&password=***"),
    (f"postgresql:///x?host=127.0.0.1&port=1&password={PASSWORD}", "&password=***"),
    (f"postgresql://u:{PASSWORD[:4]}@{PASSWORD[4:]}@127.0.0.1:1/x", "its password holds an '@'; write it as %40"),
    # a user name may hold an '@' (user@server, as some hosted databases want): reached, and masked
    (f"postgresql://u@server:{PASSWORD}@127.0.0.1:1/x", "postgresql://u@server:***@127.0.0.1:1/x': OperationalError"),
])
def test_a_password_in_the_query_or_holding_an_at_is_masked(tmp_path, url, shown):
    out = cli("run", "--study", "precision", "--storage", url, cwd=tmp_path)
    assert out.returncode == 2
    line = one_error_line(out)
    assert shown in line and PASSWORD[:4] not in out.stdout + out.stderr and PASSWORD[4:] not in out.stderr, line
    # what a driver says of such a URL, should one be given it: the password's tail read as the host
    driver_text = f"failed to resolve host '{PASSWORD[4:]}@127.0.0.1'" if "%40" in shown else f"bad {PASSWORD}"
    error = storage_module.storage_error(url, RuntimeError(driver_text))
    assert PASSWORD[4:] not in str(error) and PASSWORD[:4] not in str(error), error


def test_postgres_scheme_is_refused_with_the_right_one(tmp_path):
    out = cli("run", "--study", "precision", "--storage", f"postgres://u:{PASSWORD}@127.0.0.1:1/x", cwd=tmp_path)
    assert out.returncode == 2
    line = one_error_line(out)
    assert "postgresql://u:***@127.0.0.1:1/x" in line and "postgres://" in line and PASSWORD not in out.stderr
    assert list(tmp_path.iterdir()) == []


# -- 2. a one-utterance eval set ------------------------------------------------------------
def test_one_utterance_gives_wer_and_rtf_without_intervals(tmp_path, manifest):
    checkpoint = tmp_path / "tiny.pt"
    models.save_checkpoint(checkpoint, models.random_model("tiny"))  # a checkpoint's WER is measured
    out = cli("measure", "--model", checkpoint, "--eval-set", manifest, "--limit", "1", "--no-progress",
              "--beam-width", "1", "--threads", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split("  ", 1) for line in out.stdout.splitlines() if "  " in line)
    assert rows["WER [95% CI]"].strip().endswith("(no interval: one utterance)")
    assert rows["RTF mean [95% CI]"].strip().endswith("(no interval: one utterance)")

    audio = measure.load_eval_audio(manifest, limit=1)
    recognizer = models.load_model(str(checkpoint))
    from dse.core.build import build_recognizer
    from dse.core.config import TrialConfig

    result = measure.measure(build_recognizer(recognizer, TrialConfig(beam_width=1, threads=1)).recognizer, audio)
    assert result["utterances"] == 1 and isinstance(result["wer"], float)
    assert result["wer_ci95"] is None and result["rtf_mean_ci95"] is None
    assert json.loads(json.dumps(result))["wer_ci95"] is None  # a well-formed record
    assert measure.bootstrap_ci([(4, 11)]) is None and measure.wer_interval([(4, 11)]) is None


# -- 4. transcribe: a bad file among good ones ----------------------------------------------
@pytest.mark.parametrize("bad, problem", [("missing.wav", "audio file not found"),
                                          ("corrupt.wav", "unreadable or corrupt audio")])
def test_bad_input_is_reported_and_the_others_transcribed(study, tmp_path, bad, problem):
    if bad == "corrupt.wav":
        (tmp_path / bad).write_bytes(b"RIFF" + bytes(range(256)) * 8)
    out = cli("transcribe", study.bundle, study.audio[0], tmp_path / bad, study.audio[2], cwd=tmp_path)
    assert out.returncode == 2
    recorded = [t["hyp"] for t in study.trial.user_attrs["transcripts"]]
    assert out.stdout.splitlines() == [recorded[0], "", recorded[2]]  # one line per input, in order
    line = one_error_line(out)
    assert bad in line and problem in line


def test_only_bad_input_exits_two(study, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    out = cli("transcribe", study.bundle, tmp_path / "empty.wav", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "\n"
    assert "empty.wav" in one_error_line(out)


# -- 5. bundles from a newer dse --------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"version": 99}, "made by a newer dse (config version 99); upgrade"),
    ({"future_knob": 3}, "made by a newer dse (config version 3, unknown knob(s) future_knob); upgrade"),
])
@pytest.mark.parametrize("cmd", ["transcribe", "verify"])
def test_bundle_from_a_newer_dse_is_refused(study, tmp_path, change, message, cmd):
    bundle = copy_bundle(study.bundle, tmp_path)
    config = json.loads((bundle / "config.json").read_text())
    config["trial_config"].update(change)
    (bundle / "config.json").write_text(json.dumps(config))
    rewrite_manifest_line(bundle, "config.json")
    before = tree(tmp_path)
    args = [study.audio[0]] if cmd == "transcribe" else ["--no-speedup"]
    out = cli(cmd, bundle, *args, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert message in one_error_line(out)
    assert tree(tmp_path) == before


# -- 6. verify --limit compares like with like ---------------------------------------------
def test_verify_limit_compares_the_same_utterances(study, tmp_path):
    errors = study.trial.user_attrs["utterance_errors"]
    subset_wer = sum(e for e, _ in errors[:5]) / sum(w for _, w in errors[:5])
    assert subset_wer != study.trial.user_attrs["metrics"]["wer"]  # else the check proves nothing
    out = cli("verify", study.bundle, "--limit", "5", "--no-speedup", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DIFFERENT" not in out.stdout and "mismatch" not in out.stderr
    assert f"WER         recorded {subset_wer:.10g} on these 5 of 7 utterances, measured {subset_wer:.10g}: " \
           "identical" in out.stdout
    assert "5 of 5 recorded transcripts identical" in out.stdout and "verified" in out.stdout


def test_verify_limit_without_per_utterance_errors_is_refused(study, tmp_path):
    bundle = copy_bundle(study.bundle, tmp_path)  # as a bundle of an older dse: whole-set figures only
    record = json.loads((bundle / "metrics.json").read_text())
    record.pop("utterance_errors")
    record["transcripts"] = [{k: v for k, v in t.items() if k not in ("errors", "words")}
                             for t in record["transcripts"]]
    (bundle / "metrics.json").write_text(json.dumps(record))
    rewrite_manifest_line(bundle, "metrics.json")
    out = cli("verify", bundle, "--limit", "5", "--no-speedup", cwd=tmp_path)
    assert out.returncode == 2
    assert "--limit 5" in one_error_line(out) and "run without --limit" in out.stderr


# -- 7. read-only and corrupt SQLite files -------------------------------------------------
def make_studies_db(path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="old")
    for _ in range(40):
        study.tell(study.ask(), 1.0)


@pytest.fixture
def read_only_db(tmp_path):
    """A studies.db this process really cannot write: mode 0444 for a normal user; for root, whom
    modes do not stop, the immutable attribute (chattr +i), or skip where the file system has none."""
    path = tmp_path / "studies.db"
    make_studies_db(path)
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield path
        path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    if not chattr or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i here: no way to make a file read-only for root "
                    "(the sqlite URI read-only case below still runs)")
    try:
        yield path
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def test_read_only_studies_db_is_one_line(read_only_db, tmp_path):
    before = tree(tmp_path)
    out = cli("run", "--study", "precision", "--storage", f"sqlite:///{read_only_db}", cwd=tmp_path)
    assert out.returncode == 2
    line = one_error_line(out)
    assert line.startswith(f"error: studies.db is read-only: {read_only_db} cannot be written")
    assert tree(tmp_path) == before


def test_studies_db_opened_read_only_is_one_line(tmp_path):
    path = tmp_path / "studies.db"
    make_studies_db(path)
    before = tree(tmp_path)
    out = cli("run", "--study", "precision", "--storage", f"sqlite:///file:{path}?mode=ro&uri=true", cwd=tmp_path)
    assert out.returncode == 2
    assert one_error_line(out).startswith("error: studies.db is read-only:")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("damage", ["middle", "whole"])
def test_corrupt_studies_db_is_named_not_the_commit(tmp_path, damage):
    path = tmp_path / "studies.db"
    make_studies_db(path)
    data = bytearray(path.read_bytes())
    if damage == "middle":  # a valid header, garbage pages
        data[len(data) // 3: len(data) // 3 + 20000] = b"\x42" * 20000
    else:
        data[:] = b"not a database at all " * 100
    path.write_bytes(bytes(data))
    before = tree(tmp_path)
    for cmd, args in (("run", ["--study", "precision"]), ("export", ["--study", "old", "--trial", "0", "--out", "o"])):
        out = cli(cmd, *args, "--storage", f"sqlite:///{path}", cwd=tmp_path)
        assert out.returncode == 2
        line = one_error_line(out)
        assert line.startswith("error: studies.db is not a valid SQLite database (corrupt?):"), line
        assert "commit" not in line
        assert tree(tmp_path) == before


def test_read_only_is_fine_for_readers(tmp_path):
    path = tmp_path / "studies.db"
    make_studies_db(path)
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    assert optuna.get_all_study_names(storage_module.make_storage(url, writable=False)) == ["old"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_queued_trial_is_claimed_by_one_worker_only(tmp_path):
    # Optuna reads WAITING and then writes RUNNING; SQLite ignores the row lock, so two workers
    # could both claim a queued trial and both run it (in one run, Optuna's own claim, raced by two threads
    # here, took 17 of 200 trials twice). The claim is one conditional UPDATE.
    import threading
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 's.db'}"
    stores = [storage_module.make_storage(url) for _ in range(2)]
    study = optuna.create_study(storage=stores[0], study_name="claims")
    for i in range(200):
        study.enqueue_trial({"a": i})
    ids = [t._trial_id for t in study.get_trials(deepcopy=False)]
    won = [[], []]

    def claim(k):
        for trial_id in ids:
            if stores[k].set_trial_state_values(trial_id, TrialState.RUNNING):
                won[k].append(trial_id)

    workers = [threading.Thread(target=claim, args=(k,)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not set(won[0]) & set(won[1]) and sorted(won[0] + won[1]) == sorted(ids)
    assert all(t.state == TrialState.RUNNING and t.datetime_start for t in study.get_trials(deepcopy=False))
    assert not stores[1].set_trial_state_values(ids[0], TrialState.RUNNING)  # claimed already


def test_a_locked_heartbeat_is_tried_again_and_never_kills_the_heartbeat_thread(tmp_path, monkeypatch):
    """SQLite refuses a heartbeat's lock upgrade at once ("database is locked") while another worker
    waits to commit; Optuna's heartbeat thread died of it and the trial was failed under a live
    worker. The storage tries a quick refusal again, skips a beat the lock outlasts (and one refused
    only after the busy timeout), and lets any other error through."""
    import sqlalchemy
    from optuna.exceptions import StorageInternalError
    from optuna.storages import RDBStorage

    storage = storage_module.make_storage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_s=1, grace_s=5)
    study = optuna.create_study(storage=storage, study_name="hb")
    trial_id = study.ask()._trial_id
    record, calls = RDBStorage.record_heartbeat, []

    def flaky(self, tid, failures=2, error="database is locked"):
        calls.append(tid)
        if len(calls) <= failures:
            try:
                raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception(error))
            except sqlalchemy.exc.OperationalError as exc:  # as Optuna's scoped session re-raises it
                raise StorageInternalError("An exception is raised during the commit.") from exc
        return record(self, tid)

    monkeypatch.setattr(storage_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(RDBStorage, "record_heartbeat", flaky)
    storage.record_heartbeat(trial_id)  # two locked attempts, then recorded
    assert len(calls) == 3
    with contextlib.closing(sqlite3.connect(tmp_path / "hb.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = ?", (trial_id,)).fetchone()[0] == 1
    calls.clear()
    monkeypatch.setattr(RDBStorage, "record_heartbeat", lambda self, tid: flaky(self, tid, failures=99))
    storage.record_heartbeat(trial_id)  # locked throughout: the beat is skipped, nothing raised
    assert len(calls) == storage_module.HEARTBEAT_TRIES
    calls.clear()
    monkeypatch.setattr(storage_module, "HEARTBEAT_QUICK_S", 0.0)  # every refusal as if after the busy timeout
    storage.record_heartbeat(trial_id)  # not tried again: the next try would wait as long
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(RDBStorage, "record_heartbeat", lambda self, tid: flaky(self, tid, error="disk I/O error"))
    with pytest.raises(StorageInternalError):
        storage.record_heartbeat(trial_id)  # any other error is not hidden
    assert len(calls) == 1


# -- 11. nothing but a bundle is replaced; the dashboard stays on its machine and folder ------
def test_force_never_deletes_a_folder_that_is_not_a_bundle(study, tmp_path):
    out_dir = tmp_path / "photos"
    out_dir.mkdir()
    (out_dir / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    before = tree(tmp_path)
    out = cli("export", "--study", "space", "--trial", str(study.trial.number), "--storage", study.storage,
              "--out", out_dir, "--force", cwd=tmp_path)
    assert out.returncode == 2
    assert "is not a dse bundle" in out.stderr and "holiday.jpg" not in out.stdout
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_force_never_deletes_a_bundle_holding_other_files(study, tmp_path):
    bundle = copy_bundle(study.bundle, tmp_path)
    (bundle / "notes.txt").write_text("mine")
    with pytest.raises(DSEError, match="does not list: notes.txt"):
        export.export_bundle(study.storage, "space", bundle, trial=study.trial.number, force=True)
    assert (bundle / "notes.txt").read_text() == "mine"


def test_dashboard_listens_on_localhost_by_default():
    code = "from streamlit import config; print(config.get_option('server.address'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "127.0.0.1"


@pytest.mark.parametrize("name", ["/etc/dse", "../outside", "a/../../outside", "~/bundle", ".", "", " "])
def test_bundle_path_stays_in_the_deploy_folder(tmp_path, name):
    with pytest.raises(DSEError):
        export.bundle_path(tmp_path / "deploy", name)


def test_bundle_path_refuses_a_link_out_of_the_deploy_folder(tmp_path):
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "link").symlink_to(tmp_path)
    assert export.bundle_path(tmp_path / "deploy", "moe/trial-3") == (tmp_path / "deploy" / "moe" / "trial-3").resolve()
    with pytest.raises(DSEError, match="not a folder under"):
        export.bundle_path(tmp_path / "deploy", "link/escaped")


@pytest.fixture
def dashboard(monkeypatch, tmp_path):
    """The page (Streamlit's AppTest) over a demo study, started with ``-- ARGS``."""
    pytest.importorskip("streamlit")
    pytest.importorskip("plotly")
    from streamlit.testing.v1 import AppTest
    from dashboard_study import DEMO_TRIALS, write_study

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    write_study(url, "moe-demo", DEMO_TRIALS)
    monkeypatch.delenv("DSE_STORAGE", raising=False)

    def start(*args):
        monkeypatch.setattr(sys, "argv", ["dashboard/app.py", "--storage", url, *map(str, args)])
        page = AppTest.from_file(str(PROJECT_ROOT / "dashboard" / "app.py"), default_timeout=60)
        page.run()
        assert not page.exception, page.exception
        return page

    return start


@pytest.mark.parametrize("name", ["/tmp/dse-evil", "../evil"])
def test_dashboard_exports_only_under_its_deploy_folder(dashboard, tmp_path, name):
    deploy = tmp_path / "deploy"
    page = dashboard("--deploy-dir", deploy)
    before = tree(tmp_path)
    folder = next(t for t in page.text_input if t.label == "Output folder")
    assert folder.value == "moe-demo-trial3"  # a name under the deploy folder
    folder.set_value(name)
    next(b for b in page.button if b.label.startswith("Export trial")).click().run()
    assert not page.exception
    assert any("Export refused" in e.value for e in page.error), [e.value for e in page.error]
    assert tree(tmp_path) == before and not Path("/tmp/dse-evil").exists() and not deploy.exists()


def test_dashboard_storage_is_fixed_at_launch_unless_allowed(dashboard):
    page = dashboard()
    assert [t.label for t in page.sidebar.text_input] == []  # no URL field: a visitor cannot pick a storage
    assert page.sidebar.selectbox[0].label == "Study"  # only the studies in it
    assert any("set at launch" in c.value for c in page.sidebar.caption)
    page = dashboard("--allow-any-storage")
    assert [t.label for t in page.sidebar.text_input] == ["Storage"]


# -- what already worked, kept working ------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ("{precision: {choices: [fp32, int8}", "not valid YAML"),
    ("{warp_factor: {choices: [1, 2]}}", "warp_factor"),
])
def test_bad_search_space_is_refused_and_nothing_written(tmp_path, params, message):
    (tmp_path / "space.yaml").write_text(SPACE.format(checkpoint="tiny", n_trials=1, params=params))
    out = cli("run", "--study", tmp_path / "space.yaml", "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and message in out.stderr and "space.yaml" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_tampered_bundle_is_refused_by_name(study, tmp_path):
    bundle = copy_bundle(study.bundle, tmp_path)
    data = bytearray((bundle / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "weights.pt").write_bytes(bytes(data))
    out = cli("transcribe", bundle, study.audio[0], cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    line = one_error_line(out)
    assert "weights.pt" in line and "does not match MANIFEST.sha256" in line


def test_non_empty_out_without_force_is_refused(study, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("keep me")
    before = tree(tmp_path)
    out = cli("export", "--study", "space", "--trial", str(study.trial.number), "--storage", study.storage,
              "--out", out_dir, cwd=tmp_path)
    assert out.returncode == 2
    assert "not empty; pass --force" in one_error_line(out)
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- the study command: bad spaces, counts, interruptions -----------------------------------------
STUDY_SPACE = {"sampler": "grid", "objectives": [{"metric": "wer", "direction": "minimize"},
                                                 {"metric": "rtf_p95", "direction": "minimize"}],
               "fixed": {"beam_width": 1, "threads": 1}, "timing_utterances": 2, "n_trials": 2,
               "params": {"precision": {"choices": ["fp32", "int8"]}}}


def study_args(root: Path, space: dict, *extra, manifest: Optional[Path] = None) -> list:
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    return ["--study", root / "space.yaml", "--storage", f"sqlite:///{root / 's.db'}",
            "--eval-set", manifest or root / "missing.jsonl", *extra]


@pytest.mark.parametrize("params, top, message", [
    ({"right_context_frames": {"choices": [3]}}, {},
     "params.right_context_frames: 3: right_context_frames=3 must be a multiple of the time-reduction stride 4"),
    ({"adapt_steps": {"low": 8, "high": 1}}, {}, "params.adapt_steps: low 8 is above high 1; swap them"),
    ({"beam_width": {"low": 1, "high": 4, "step": 0}}, {}, "params.beam_width.step: 0 must be a positive integer"),
    ({"precision": {"choices": ["fp32"]}}, {"n_trials": "many"}, "n_trials: 'many' must be a whole number"),
    ({"moe_experts": {"choices": [0, 4]}, "moe_hidden": {"choices": [4096]}}, {},
     "params.moe_hidden: 4096: moe_hidden=4096 exceeds the dense FFN width"),
    ({"precision": {"choices": ["fp32"]}}, {"eval_limit": -3}, "eval_limit: -3 must be a whole number of utterances"),
    ({"precision": {"choices": ["fp32"]}}, {"timing_utterances": 0}, "timing_utterances: 0 must be a whole number (1 or more)"),
    ({"precision": {"choices": ["fp32"]}}, {"fixed": {"threads": 0}}, "fixed.threads: 0 must be an integer"),
])
def test_a_space_value_no_trial_could_run_is_refused_before_any_trial(study, tmp_path, params, top, message):
    space = dict(STUDY_SPACE, model=str(study.checkpoint), params=params, **top)
    out = cli("run", *study_args(tmp_path, space, manifest=study.manifest), cwd=tmp_path)
    assert out.returncode == 2
    line = one_error_line(out)
    assert "space.yaml" in line and message in line
    assert not (tmp_path / "s.db").exists()


def test_a_study_in_which_every_trial_failed_exits_non_zero(tmp_path, manifest):
    # the torch backend exports nothing: an export-time objective is never measured, every trial
    # fails, and the command says so, with each trial's reason
    space = dict(STUDY_SPACE, model="tiny-random", objectives=[{"metric": "export_s", "direction": "minimize"}])
    out = cli("run", *study_args(tmp_path, space, manifest=manifest), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "every trial failed" in out.stderr and "Traceback" not in out.stderr
    assert "failed: objective export_s was not measured" in out.stderr
    trials = optuna.load_study(study_name="space", storage=f"sqlite:///{tmp_path / 's.db'}").trials
    assert trials and all(t.state == optuna.trial.TrialState.FAIL for t in trials if t.user_attrs.get("duplicate_of") is None)


def test_n_trials_zero_runs_nothing(study, tmp_path):
    space = dict(STUDY_SPACE, model=str(study.checkpoint))
    out = cli("run", *study_args(tmp_path, space, "--n-trials", "0", manifest=study.manifest), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "0 to run" in out.stderr
    assert optuna.load_study(study_name="space", storage=f"sqlite:///{tmp_path / 's.db'}").trials == []
    negative = cli("run", *study_args(tmp_path, space, "--n-trials", "-1", manifest=study.manifest), cwd=tmp_path)
    assert negative.returncode == 2 and "--n-trials -1" in negative.stderr


@pytest.mark.parametrize("command, flag", [("run", "--eval-limit"), ("measure", "--limit"), ("verify", "--limit")])
@pytest.mark.parametrize("value", [-3, 0])
def test_an_utterance_limit_below_one_is_refused(study, tmp_path, command, flag, value):
    # a negative limit sliced [:-3]: every utterance but the last three, silently
    if command == "run":
        args = study_args(tmp_path, dict(STUDY_SPACE, model=str(study.checkpoint)), f"{flag}={value}",
                          manifest=study.manifest)
    elif command == "measure":
        args = ["--model", study.checkpoint, "--eval-set", study.manifest, f"{flag}={value}"]
    else:
        args = [study.bundle, f"{flag}={value}"]
    out = cli(command, *args, cwd=tmp_path)
    assert out.returncode == 2 and f"{flag} {value}" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "s.db").exists()
    from dse.core.measure import load_eval_audio
    with pytest.raises(DSEError, match=f"limit of {value}"):
        load_eval_audio(study.manifest, value)


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_a_timeout_that_is_not_a_budget_is_refused(study, tmp_path, value):
    space = dict(STUDY_SPACE, model=str(study.checkpoint))
    out = cli("run", *study_args(tmp_path, space, f"--timeout={value}", manifest=study.manifest), cwd=tmp_path)
    assert out.returncode == 2 and f"--timeout {float(value)}" in out.stderr, out.stderr
    assert not (tmp_path / "s.db").exists()


def test_missing_eval_set_leaves_no_study_behind(study, tmp_path):
    space = dict(STUDY_SPACE, model=str(study.checkpoint))
    out = cli("run", *study_args(tmp_path, space), cwd=tmp_path)
    assert out.returncode == 2 and "missing.jsonl not found" in one_error_line(out)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_worker_leaves_no_trial_running_and_no_traceback(study, tmp_path, sig):
    # long enough to be caught mid-trial: many utterances
    manifest = write_eval_set(tmp_path / "long", ["hello world"] * 40)
    space = dict(STUDY_SPACE, model=str(study.checkpoint), timing_utterances=40)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), DSE_LOCK_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "dse.run", *map(str, study_args(tmp_path, space, manifest=manifest))],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            if any(t.state == optuna.trial.TrialState.RUNNING
                   for t in optuna.load_study(study_name="space", storage=storage).trials):
                break
        except Exception:
            continue
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    trials = optuna.load_study(study_name="space", storage=storage).trials
    assert trials and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert stopped and stopped[0].user_attrs["fail_reason"].startswith("interrupted")


# A signal that lands in Optuna's own bookkeeping around a trial: right after a trial is asked,
# right after its heartbeat thread starts (an interrupt there left the thread running, and the
# process never exited), right after it is told. The process sends the signal to itself there.
SIGNAL_INSIDE = """
import os, signal, sys
import optuna
from optuna.storages import _heartbeat
from optuna.study import _optimize
where, sig = sys.argv[1], int(sys.argv[2])
twice = where.endswith("-twice")
where = where.removesuffix("-twice")
sent = []

def after(call):
    def patched(*args, **kwargs):
        result = call(*args, **kwargs)
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), sig)
            if twice:
                os.kill(os.getpid(), sig)
        return result
    return patched

if where == "front":  # the front's re-measurement: a signal there is obeyed at once
    import time
    from dse.search import study as study_module
    study_module.resolve_front = lambda *args: (os.kill(os.getpid(), sig), time.sleep(30))
elif where == "ask":
    optuna.Study.ask = after(optuna.Study.ask)
elif where == "heartbeat":
    _heartbeat.HeartbeatThread.start = after(_heartbeat.HeartbeatThread.start)
else:
    _optimize._tell_with_warning = after(_optimize._tell_with_warning)
from dse import run
sys.exit(run.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["ask", "heartbeat", "tell", "front"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_optunas_bookkeeping_is_held_until_it_is_safe(study, tmp_path, where, sig):
    space = dict(STUDY_SPACE, model=str(study.checkpoint))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), DSE_LOCK_DIR=str(tmp_path))
    args = [sys.executable, "-c", SIGNAL_INSIDE, where, str(int(sig)),
            *map(str, study_args(tmp_path, space, manifest=study.manifest))]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the worker did not exit after the signal:\n{err}")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    trials = optuna.load_study(study_name="space", storage=f"sqlite:///{tmp_path / 's.db'}").trials
    assert trials and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in trials:  # a trial the signal ended is recorded as interrupted, and retried by the next run
        if t.state == optuna.trial.TrialState.FAIL:
            assert t.user_attrs["fail_reason"].startswith("interrupted")
    if where == "tell":  # held past the trial it landed after: that trial finished, the next never started
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    if where == "front":  # every trial ran; the exit status still says the run was stopped
        assert [t.state for t in trials].count(optuna.trial.TrialState.COMPLETE) == 2
        assert "interrupted while re-measuring the front" in err


EXPORT_STOPPED = """
import os, signal, sys, time
from dse.deploy import export
sig, where = int(sys.argv[1]), sys.argv[2]
if where == "writing":
    export._write_bundle = lambda *args: (os.kill(os.getpid(), sig), time.sleep(30))
else:  # as the finished bundle is swapped for the old one: the swap completes, and so does the export
    move = export._move_into_place
    def patched(tmp, out, force):
        os.kill(os.getpid(), sig)
        move(tmp, out, force)
    export._move_into_place = patched
sys.exit(export.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["writing", "moving"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_export_leaves_the_old_bundle_or_the_new_one_and_nothing_partial(study, tmp_path, sig, where):
    out = shutil.copytree(study.bundle, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run([sys.executable, "-c", EXPORT_STOPPED, str(int(sig)), where, "--storage", study.storage,
                           "--study", "space", "--trial", str(study.trial.number), "--out", str(out), "--force"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial or old folder left beside it
    if where == "writing":
        assert proc.returncode == 130 and "interrupted: nothing written" in proc.stderr, proc.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    else:
        assert proc.returncode == 0 and "exported trial" in proc.stdout, proc.stderr
        assert (out / "MANIFEST.sha256").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_in_optunas_bookkeeping_ends_the_worker_at_once(study, tmp_path, sig):
    # raising there would leave the heartbeat thread running (a hang) or break Optuna's tell: the
    # process ends by the signal itself instead
    space = dict(STUDY_SPACE, model=str(study.checkpoint))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), DSE_LOCK_DIR=str(tmp_path))
    args = [sys.executable, "-c", SIGNAL_INSIDE, "heartbeat-twice", str(int(sig)),
            *map(str, study_args(tmp_path, space, manifest=study.manifest))]
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -sig and "stopped at once" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_held_signal_is_raised_at_the_next_safe_point_and_a_second_one_at_once():
    from dse.core.interrupts import Interrupts

    interrupts = Interrupts()
    with pytest.raises(KeyboardInterrupt):  # held in the block, raised where it ends
        with interrupts.held():
            interrupts.handler(signal.SIGTERM, None)
            ran_on = True
    assert ran_on and not interrupts.pending
    forced = []
    interrupts.force = forced.append  # the process itself would end here, by the signal
    with pytest.raises(KeyboardInterrupt):  # the user insists: the second ends the process at once
        with interrupts.held():
            interrupts.handler(signal.SIGINT, None)
            interrupts.handler(signal.SIGINT, None)
            assert forced == [signal.SIGINT]
    with interrupts.held(last=True):  # a block that must not be cut holds every signal, and drops them
        interrupts.handler(signal.SIGTERM, None)
        interrupts.handler(signal.SIGTERM, None)
    assert forced == [signal.SIGINT] and not interrupts.pending
    with pytest.raises(OSError):  # a block that fails leaves nothing held for the next one
        with interrupts.held():
            interrupts.handler(signal.SIGTERM, None)
            raise OSError("disk full")
    assert not interrupts.pending
    with interrupts.held():
        interrupts.handler(signal.SIGTERM, None)
        with pytest.raises(KeyboardInterrupt):  # a trial's work starts: the held signal lands there
            with interrupts.raised():
                pytest.fail("the trial's work must not start")
        with pytest.raises(KeyboardInterrupt):  # and inside it, signals are raised at once
            with interrupts.raised():
                interrupts.handler(signal.SIGTERM, None)
        assert interrupts.holding and not interrupts.pending
    with pytest.raises(KeyboardInterrupt):  # no study running: raised at once
        interrupts.handler(signal.SIGTERM, None)


@pytest.mark.parametrize("out, message", [("", "--out is empty"), (".", "is the folder this command runs in"),
                                          ("a.wav/sub", "a.wav is not a folder")])
def test_an_export_target_that_cannot_be_a_bundle_is_refused_and_the_folder_kept(study, tmp_path, out, message):
    here = shutil.copytree(study.bundle, tmp_path / "here")  # --force would replace the folder it runs in
    (here / "a.wav").write_bytes(b"RIFF")
    before = sorted(p.name for p in here.iterdir())
    res = cli("export", "--storage", study.storage, "--study", "space", "--trial", study.trial.number,
              "--out", out, "--force", cwd=here)
    assert res.returncode == 2 and message in one_error_line(res), res.stderr
    assert sorted(p.name for p in here.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["here"]


@pytest.mark.parametrize("command, flags, message", [
    ("run", ["--study-name", ""], "--study-name is empty"),
    ("run", ["--seed", "-1"], "--seed -1: give a whole number from 0"),
    ("run", ["--seed", str(2**32)], f"--seed {2**32}"),
    ("run", ["--device", "bogus"], "--device 'bogus': give cpu or cuda"),
    ("run", ["--eval-set", ""], "--eval-set is empty"),
    ("run", ["--adapt-set", ""], "--adapt-set is empty"),
    ("measure", ["--seed", str(10**20)], f"--seed {10**20}"),
    ("measure", ["--eval-set", ""], "--eval-set is empty"),
    ("measure", ["--adapt-steps", "5"], "dse.measure measures weights as they are"),
    ("verify", ["--eval-set", ""], "--eval-set is empty"),
])
def test_a_flag_value_that_would_be_ignored_or_crash_is_refused(study, tmp_path, command, flags, message):
    # each was silently replaced by a default (an empty name or path, a device) or ended in a traceback (a seed)
    if command == "run":
        args = ["--study", "precision", "--storage", f"sqlite:///{tmp_path / 's.db'}", *flags]
    elif command == "measure":
        args = ["--model", study.checkpoint, *flags]
    else:
        args = [study.bundle, *flags]
    out = cli(command, *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b"RIFF\x00\xff\xfeWAVE"), "not a YAML text file"),
    (lambda p: p.write_text("sampler: grid\nparams: {precision: {choices: [fp32\n"), "not valid YAML at line 3"),
])
def test_a_space_file_that_is_not_yaml_is_one_line(tmp_path, make, message):
    make(tmp_path / "space.yaml")
    out = cli("run", "--study", tmp_path / "space.yaml", "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path)
    assert out.returncode == 2 and message in one_error_line(out), out.stderr
    assert not (tmp_path / "s.db").exists()


def test_verify_says_when_a_bundle_records_nothing_to_compare(tmp_path, manifest):
    # random weights record no error rate and no transcript: "accuracy identical" would claim a check never made
    space = dict(STUDY_SPACE, model="tiny-random", objectives=[{"metric": "rtf_p95", "direction": "minimize"}],
                 n_trials=1, params={"precision": {"choices": ["fp32"]}})
    assert cli("run", *study_args(tmp_path, space, manifest=manifest), cwd=tmp_path).returncode == 0
    export.export_bundle(f"sqlite:///{tmp_path / 's.db'}", "space", tmp_path / "bundle", trial=0)
    out = cli("verify", tmp_path / "bundle", "--no-speedup", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "accuracy not compared" in out.stdout and "accuracy identical" not in out.stdout


@pytest.mark.parametrize("command, args, message", [
    ("measure", ["--lm", "{dir}"], "is a directory; give the .lm.gz file"),
    ("measure", ["--model", "{dir}"], "is a directory, not a checkpoint file"),
    ("measure", ["--model", ""], "--model is empty"),
    ("measure", ["--model", "base", "--weights", ""], "--weights is empty"),
    ("run", ["--study", "precision", "--storage", "sqlite:///{dir}"], "is a directory, not an SQLite file"),
    ("export", ["--study", "s", "--trial", "0", "--out", "o", "--storage", "sqlite:///{dir}"],
     "is a directory, not an SQLite file"),
    ("transcribe", ["", "a.wav"], "the bundle path is empty"),
])
def test_a_folder_or_an_empty_path_is_named_as_such(tmp_path, command, args, message):
    # they read "not found", or another file's problem: a folder given for a file, or "" read as "."
    (tmp_path / "folder").mkdir()
    out = cli(command, *[a.replace("{dir}", str(tmp_path / "folder")) for a in args], cwd=tmp_path)
    assert out.returncode == 2 and message in one_error_line(out), out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_an_eval_set_without_usable_audio_leaves_no_study_behind(study, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "x", "path": "nope.wav", "duration": 1.0, "text": "hi"}) + "\n")
    space = dict(STUDY_SPACE, model=str(study.checkpoint))
    out = cli("run", *study_args(tmp_path, space, manifest=manifest), cwd=tmp_path)
    assert out.returncode == 2 and "no usable utterances" in out.stderr, out.stderr
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 's.db'}") == []


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    # `python -m dse.lm score ... | head -c 0`: the reader is gone before the first line
    texts = tmp_path / "t.txt"
    texts.write_text("hello world\nthe cat sat\n")
    assert cli("lm", "build", "--out", tmp_path / "x.lm.gz", "--order", "3", "--texts", texts, cwd=tmp_path).returncode == 0
    read, write = os.pipe()
    os.close(read)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    try:
        out = subprocess.run([sys.executable, "-m", "dse.lm", "score", str(tmp_path / "x.lm.gz"), str(texts)],
                             stdout=write, stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=120)
    finally:
        os.close(write)
    assert out.returncode == 141 and b"Traceback" not in out.stderr, out.stderr.decode()

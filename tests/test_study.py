"""The study service on a tiny model: real Optuna storages, real subprocesses."""
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from dse.core import models
from dse import run

SPACE = {
    "sampler": "grid",
    "objectives": [{"metric": "wer", "direction": "minimize"}, {"metric": "rtf_p95", "direction": "minimize"}],
    "constraints": [{"metric": "ttft_s", "max": 600.0}],
    "fixed": {"beam_width": 1},
    "params": {"precision": {"choices": ["fp32", "int8"]}, "threads": {"choices": [1, 2]}},
    "timing_utterances": 2,
}


@pytest.fixture
def setup(tmp_path, manifest):
    """A tiny trained-looking checkpoint (WER measurable), a space file and a storage URL."""
    ckpt = tmp_path / "tiny.pt"
    models.save_checkpoint(ckpt, models.random_model("tiny", seed=0))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(dict(SPACE, model=str(ckpt), n_trials=2)))
    return {"ckpt": ckpt, "space": space, "manifest": manifest, "storage": f"sqlite:///{tmp_path / 's.db'}",
            "tmp": tmp_path}


def args(s, *extra):
    return ["--study", str(s["space"]), "--storage", s["storage"], "--eval-set", str(s["manifest"]), *extra]


def load(s, name="space"):
    return optuna.load_study(study_name=name, storage=s["storage"])


def test_two_trial_study_records_everything(setup, monkeypatch):
    monkeypatch.setenv("DSE_LOCK_DIR", str(setup["tmp"]))
    # the baseline (threads 2) is the first trial; the grid's other point differs in threads only
    setup["space"].write_text(yaml.safe_dump(dict(SPACE, model=str(setup["ckpt"]), n_trials=2,
                                                  params={"threads": {"choices": [1, 2]}})))
    assert run.main(args(setup)) == 0
    study = load(setup)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:
        ua = t.user_attrs
        assert t.values[0] == ua["metrics"]["wer"] and t.values[1] == ua["metrics"]["rtf_p95"]
        assert 0 <= ua["metrics"]["wer"] and ua["metrics"]["rtf_p95"] > 0
        assert set(ua["phases_s"]) >= {"build", "measure", "baseline"}
        assert ua["machine"]["torch"] and ua["config"]["beam_width"] == 1
        assert ua["speedup"]["samples"] == 2 and ua["constraint_violations"][0] <= 0
    # the two trials differ only in threads: the second reuses the first's WER (same accuracy key)
    first, second = sorted(done, key=lambda t: t.number)
    assert first.user_attrs["accuracy_key"] == second.user_attrs["accuracy_key"]
    assert second.user_attrs["reused_wer_from"] == first.number
    assert second.user_attrs["metrics"]["wer"] == first.user_attrs["metrics"]["wer"]
    # and its interval and per-utterance errors, which a paired comparison of the two needs
    errors = first.user_attrs["utterance_errors"]
    assert len(errors) == 3
    assert sum(e for e, _ in errors) / sum(w for _, w in errors) == pytest.approx(first.user_attrs["metrics"]["wer"])
    assert second.user_attrs["utterance_errors"] == errors and second.user_attrs["wer_ci95"] == first.user_attrs["wer_ci95"]
    assert second.user_attrs["utterances_timed"] == 2 < first.user_attrs["utterances_timed"] == 3
    # resuming with the same target runs nothing more
    before = len(load(setup).trials)
    assert run.main(args(setup)) == 0
    assert len(load(setup).trials) == before


def test_reuse_rule_needs_same_accuracy_knobs(setup, monkeypatch):
    monkeypatch.setenv("DSE_LOCK_DIR", str(setup["tmp"]))
    space = dict(SPACE, model=str(setup["ckpt"]), n_trials=2,
                 params={"precision": {"choices": ["fp32", "int8"]}})
    setup["space"].write_text(yaml.safe_dump(space))
    assert run.main(args(setup)) == 0
    done = [t for t in load(setup).trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and all("reused_wer_from" not in t.user_attrs for t in done)


def test_failed_trial_recorded_and_study_goes_on(setup, monkeypatch):
    monkeypatch.setenv("DSE_LOCK_DIR", str(setup["tmp"]))
    import torch

    def broken(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    # a value every trial could run with passes the space check; this one fails when it runs
    space = dict(SPACE, model=str(setup["ckpt"]), n_trials=2, params={"compile": {"choices": ["off", "default"]}})
    setup["space"].write_text(yaml.safe_dump(space))
    # the grid has two points: the baseline (compile off) completes, the other fails and is not
    # retried, so the space is exhausted with one finished configuration
    assert run.main(args(setup)) == 0
    trials = load(setup).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 1
    assert len(failed) == 1 and "inductor exploded" in failed[0].user_attrs["fail_reason"]


def test_space_value_no_trial_could_run_is_refused_before_any_trial(setup, monkeypatch, capsys):
    monkeypatch.setenv("DSE_LOCK_DIR", str(setup["tmp"]))
    # right context 2 is legal for the space file but not a multiple of the model's stride 4
    space = dict(SPACE, model=str(setup["ckpt"]), n_trials=2, params={"right_context_frames": {"choices": [2, 4]}})
    setup["space"].write_text(yaml.safe_dump(space))
    assert run.main(args(setup)) == 2
    err = capsys.readouterr().err
    assert "space.yaml: params.right_context_frames: 2: right_context_frames=2 must be a multiple of the " \
           "time-reduction stride 4" in err
    assert not (setup["tmp"] / "s.db").exists()  # nothing written


@pytest.mark.parametrize("change, key", [
    ({}, "objectives[0]: wer: tiny-random has random weights, whose WER is not measured"),
    ({"objectives": [{"metric": "rtf_p95", "direction": "minimize"}], "constraints": [{"metric": "cer", "max": 0.5}]},
     "constraints[0]: cer: tiny-random has random weights"),
    ({"objectives": [{"metric": "rtf_p95", "direction": "minimize"}], "fixed": {"adapt_steps": 10}},
     "fixed.adapt_steps: adapting needs trained weights and an adaptation split, and tiny-random has random weights"),
])
def test_what_random_weights_cannot_give_is_refused_before_any_trial(setup, monkeypatch, capsys, change, key):
    monkeypatch.setenv("DSE_LOCK_DIR", str(setup["tmp"]))
    space = dict(SPACE, model="tiny-random", n_trials=1, params={"precision": {"choices": ["fp32"]}}, **change)
    setup["space"].write_text(yaml.safe_dump(space))
    assert run.main(args(setup, "--n-trials", "1", "--timeout", "60")) == 2
    assert key in " ".join(capsys.readouterr().err.split())
    assert not (setup["tmp"] / "s.db").exists()  # nothing written


def test_adapting_without_an_adaptation_split_is_refused_before_any_trial(setup, monkeypatch, capsys):
    space = dict(SPACE, model=str(setup["ckpt"]), n_trials=1, params={"adapt_steps": {"choices": [0, 10]}})
    setup["space"].write_text(yaml.safe_dump(space))
    assert run.main(args(setup, "--adapt-set", str(setup["tmp"] / "typo.jsonl"))) == 2
    assert "adapt set" in capsys.readouterr().err and not (setup["tmp"] / "s.db").exists()


def test_a_time_budget_stops_starting_trials_and_says_how_to_go_on(setup, monkeypatch, capsys):
    monkeypatch.setenv("DSE_LOCK_DIR", str(setup["tmp"]))
    space = dict(SPACE, model=str(setup["ckpt"]), n_trials=3, timeout=0.001,
                 params={"precision": {"choices": ["fp32", "int8", "bf16"]}})
    setup["space"].write_text(yaml.safe_dump(space))
    assert run.main(args(setup)) == 0
    trials = load(setup).trials
    finished = [t.state for t in trials].count(TrialState.COMPLETE)
    assert 1 <= finished < 3  # a trial runs (Optuna checks the budget after each), the study stops short
    err = " ".join(capsys.readouterr().err.split())  # the console writes to stderr, wrapped
    assert f"time budget: no new trial after 0 s (space.yaml); {finished} of 3 distinct configurations finished" in err


def _worker(setup, n, extra=()):
    env = dict(os.environ, DSE_LOCK_DIR=str(setup["tmp"]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dse.run", *args(setup, "--n-trials", str(n), *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _running_with_heartbeat(setup):
    """How many RUNNING trials have recorded a heartbeat (the tables exist once the study does)."""
    with sqlite3.connect(setup["storage"].removeprefix("sqlite:///")) as db:
        return db.execute("SELECT COUNT(*) FROM trials JOIN trial_heartbeats USING (trial_id)"
                          " WHERE trials.state = 'RUNNING'").fetchone()[0]


def test_resume_after_killed_worker(setup):
    space = dict(SPACE, model=str(setup["ckpt"]), sampler="random", n_trials=3,
                 params={"beam_width": {"choices": [1, 2, 3]}})
    setup["space"].write_text(yaml.safe_dump(space))
    proc = _worker(setup, 3)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a trial is running (poll often: tiny trials are short)
        time.sleep(0.05)
        if proc.poll() is not None:
            break  # finished before a poll saw a trial running: the assertion below says so
        try:
            load(setup)
        except KeyError:
            continue
        if _running_with_heartbeat(setup):
            break  # Optuna never calls a trial stale before its first heartbeat row exists
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    running = [t.number for t in load(setup).trials if t.state == TrialState.RUNNING]
    assert running, "the killed worker should leave its trial RUNNING"
    # the heartbeat grace period is long for real studies; a storage with a short one fails the stale trial
    from dse.search.storage import make_storage
    storage = make_storage(setup["storage"], heartbeat_s=1, grace_s=1)
    time.sleep(2)
    optuna.storages.fail_stale_trials(optuna.load_study(study_name="space", storage=storage))
    trials = {t.number: t for t in load(setup).trials}
    assert all(trials[n].state == TrialState.FAIL for n in running)
    assert all(trials[n].user_attrs["fail_reason"].startswith("worker stopped responding") for n in running)
    out = _worker(setup, 3).communicate(timeout=600)[0]
    study = load(setup)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 3, out
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") in running]
    assert retried, "the stale trial is retried with the same parameters"


def test_two_workers_sqlite_no_trial_lost_or_duplicated(setup):
    space = dict(SPACE, model=str(setup["ckpt"]), sampler="random", n_trials=4,
                 params={"beam_width": {"choices": [1, 2, 3, 4]}})
    setup["space"].write_text(yaml.safe_dump(space))
    procs = [_worker(setup, 4) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(f"exit {p.returncode}:\n{o[-3000:]}"
                                                            for p, o in zip(procs, outs))
    trials = load(setup).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # the space has exactly 4 distinct configurations: each measured once, whichever worker drew it
    assert len(complete) == 4
    assert len({t.user_attrs["config_key"] for t in complete}) == 4
    assert len({t.number for t in trials}) == len(trials)
    # a repeat proposal (the two workers racing) is recorded as such, not measured again
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.PRUNED and t.user_attrs["duplicate_of"] is not None for t in others)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A real PostgreSQL server on loopback, owned by the test."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")  # SQLAlchemy 2.1 drives postgresql:// URLs with psycopg 3
    bin_dir = bins[-1]
    # not under pytest's tmp_path: its parents are private to root, and postgres runs as its own user
    data = Path(tempfile.mkdtemp(prefix="dse-pg-"))
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "dse"],
                   check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen(as_user + [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                                       "-k", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://dse@127.0.0.1:{port}/postgres"
    for _ in range(100):
        if subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    shutil.rmtree(data, ignore_errors=True)


def test_three_workers_on_postgresql(setup, postgres):
    space = dict(SPACE, model=str(setup["ckpt"]), sampler="random", n_trials=5,
                 params={"beam_width": {"choices": [1, 2, 3, 4, 5]}})
    setup["space"].write_text(yaml.safe_dump(space))
    setup["storage"] = postgres
    procs = [_worker(setup, 5) for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    trials = load(setup).trials
    states = [(t.number, t.state.name, t.user_attrs.get("duplicate_of")) for t in trials]  # shown on failure
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 5 and len({t.user_attrs["config_key"] for t in complete}) == 5, (states, outs)
    assert len({t.number for t in trials}) == len(trials)
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.PRUNED and t.user_attrs["duplicate_of"] is not None for t in others), states


@pytest.mark.parametrize("sampler, before, after, message", [
    ("grid", {"precision": {"choices": ["fp32", "int8"]}}, {"precision": {"choices": ["fp32", "bf16"]}},
     "precision: ['fp32', 'int8'] then, ['fp32', 'bf16'] now"),
    ("random", {"beam_width": {"choices": [1, 4]}}, {"beam_width": {"choices": [1, 2, 4]}}, "beam_width: trial "),
])
def test_a_study_resumed_with_other_choices_is_refused_before_any_trial(setup, monkeypatch, capsys, sampler, before,
                                                                        after, message):
    # Optuna failed every new trial on changed categories, and a level silently meant another value
    monkeypatch.setenv("DSE_LOCK_DIR", str(setup["tmp"]))
    space = dict(SPACE, model=str(setup["ckpt"]), sampler=sampler, params=before, fixed={"threads": 1},
                 baseline={"beam_width": 4, "precision": "fp32"})
    setup["space"].write_text(yaml.safe_dump(space))
    assert run.main(args(setup, "--n-trials", "1")) == 0
    n = len(load(setup).trials)
    setup["space"].write_text(yaml.safe_dump(dict(space, params=after)))
    capsys.readouterr()
    assert run.main(args(setup, "--n-trials", "2")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "another --study-name" in err, err
    assert len(load(setup).trials) == n
    setup["space"].write_text(yaml.safe_dump(dict(space, params=dict(before, threads={"choices": [1, 2]}))))
    assert run.main(args(setup, "--n-trials", "1")) == 0  # adding a knob is no conflict


@pytest.mark.parametrize("name", ["moe", "full", "precision", "context", "frame", "base-latency"])
@pytest.mark.parametrize("levels", [True, False])
def test_a_shipped_space_resumes_its_own_trials_and_not_an_edited_copy(name, levels):
    # a dense trial's MoE sub-knobs are recorded in canonical form: a replay through the same space
    # gives them back, so the same command always resumes; an inserted choice changes what a level means
    import dataclasses
    import warnings

    from dse.search.space import Param, load_space
    from dse.search.study import resume_conflicts

    space = load_space(name).for_model(True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(20):
            trial = study.ask()
            trial.set_user_attr("config", space.suggest(trial, levels=levels).to_dict())
            study.tell(trial, [0.0] * len(space.directions))
    assert resume_conflicts(study, space, levels) == []
    ordered = [p for p in space.params if p.ordered and len(p.choices) > 1]
    if ordered:
        p = ordered[0]
        low = min(p.choices)
        inserted = dataclasses.replace(p, choices=tuple(sorted({*p.choices, low - 1})))  # below every level
        edited = dataclasses.replace(space, params=tuple(inserted if q is p else q for q in space.params))
        assert any(line.startswith(f"{p.knob}:") for line in resume_conflicts(study, edited, levels))

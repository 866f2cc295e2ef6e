"""Exported bundles: a real tiny study in SQLite, exported, loaded, streamed, checked and verified."""
import hashlib
import json
import shutil
import subprocess
import sys
import types

import optuna
import pytest
import soundfile
import torch

from conftest import tone
from dse.deploy import export
from dse.core import measure
from dse.core import models
from dse import run
from dse.deploy import runtime
from dse.deploy import transcribe
from dse.deploy import verify
from dse.core.config import TrialConfig
from dse.core.errors import AudioError, DSEError
from dse.core.moe import moe_blocks

SPACE = """\
model: {checkpoint}
sampler: grid
n_trials: {n_trials}
objectives: [{{metric: wer, direction: minimize}}, {{metric: rtf_p95, direction: minimize}}]
params: {params}
fixed: {{beam_width: 1, threads: 1, moe_top_k: 1, moe_hidden: 32}}
timing_utterances: 2
"""
GRID = "{precision: {choices: [fp32, int8]}, moe_experts: {choices: [0, 2]}}"
ADAPTED = "{precision: {choices: [int8]}, moe_experts: {choices: [2]}, adapt_steps: {choices: [2]}}"
KINDS = {"fp32": ("fp32", 0), "int8": ("int8", 0), "moe": ("fp32", 2)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A four-trial grid study (fp32/int8 x dense/MoE) of a tiny checkpoint on three short utterances."""
    root = tmp_path_factory.mktemp("study")
    (root / "audio").mkdir()
    rows = []
    for i, secs in enumerate([1.3, 0.9, 2.1]):
        soundfile.write(root / "audio" / f"u{i}.wav", tone(secs, freq=200 + 50 * i, seed=i), 16000)
        rows.append({"path": f"audio/u{i}.wav", "duration": secs, "text": f"hello world {i}"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = root / "tiny.pt"
    models.save_checkpoint(checkpoint, models.random_model("tiny"))
    space = root / "space.yaml"
    space.write_text(SPACE.format(checkpoint=checkpoint, n_trials=4, params=GRID))
    storage = f"sqlite:///{root}/s.db"
    assert run.main(["--study", str(space), "--storage", storage, "--eval-set", str(manifest),
                     "--model", str(checkpoint)]) == 0
    loaded = optuna.load_study(study_name="space", storage=storage)
    trials = {}
    for t in loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        cfg = t.user_attrs["config"]
        trials[(cfg["precision"], cfg["moe_experts"])] = t
    assert len(trials) == 4
    return types.SimpleNamespace(root=root, storage=storage, name="space", manifest=manifest,
                                 trials={kind: trials[key] for kind, key in KINDS.items()},
                                 audio=[root / "audio" / f"u{i}.wav" for i in range(3)],
                                 refs=[r["text"] for r in rows])


@pytest.fixture(scope="module")
def adapted(study):
    """A study of the baseline and one int8 MoE trial that adapts its weights (2 steps) on a 34-utterance split."""
    root = study.root / "adapted"
    (root / "audio").mkdir(parents=True)
    rows = []
    for i in range(34):  # the adapter keeps the first 30 as its dev set
        soundfile.write(root / "audio" / f"a{i}.wav", tone(0.5 + 0.02 * i, freq=150 + 10 * i, seed=i), 16000)
        rows.append({"path": f"audio/a{i}.wav", "text": "hello world"})
    adapt_set = root / "adapt.jsonl"
    adapt_set.write_text("".join(json.dumps(r) + "\n" for r in rows))
    space = root / "space.yaml"
    space.write_text(SPACE.format(checkpoint=study.root / "tiny.pt", n_trials=2, params=ADAPTED))
    storage = f"sqlite:///{root}/s.db"
    cache = root / "cache"
    argv = ["--study", str(space), "--storage", storage, "--eval-set", str(study.manifest), "--model",
            str(study.root / "tiny.pt"), "--adapt-set", str(adapt_set), "--cache-dir", str(cache)]
    # A first attempt can FAIL after adapting (the precision transform cannot deep-copy a freshly
    # trained MoE block); the retry then builds from the adaptation cache.
    for _ in range(2):
        assert run.main(argv) == 0
        loaded = optuna.load_study(study_name="space", storage=storage)
        complete = [t for t in loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                    if t.user_attrs.get("anchor") != "baseline"]
        if complete:
            break
    assert len(complete) == 1 and complete[0].user_attrs["config"]["adapt_steps"] == 2
    return types.SimpleNamespace(storage=storage, trial=complete[0], cache=cache)


@pytest.fixture(scope="module")
def bundles(study):
    out = study.root / "bundles"
    return {kind: export.export_bundle(study.storage, study.name, out / kind, trial=t.number)
            for kind, t in study.trials.items()}


def copy_bundle(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / bundle.name)


def rewrite_manifest_line(bundle, name):
    """Make MANIFEST.sha256 agree with ``name`` again, leaving every other line as it was."""
    digest = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    lines = [f"{digest}  {name}" if line.endswith(f"  {name}") else line
             for line in (bundle / runtime.MANIFEST_FILE).read_text().splitlines()]
    (bundle / runtime.MANIFEST_FILE).write_text("\n".join(lines) + "\n")


# -- what a bundle holds --------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_manifest_lists_every_other_file_with_its_sha256(bundles, kind):
    bundle = bundles[kind]
    listed = dict(reversed(line.split("  ")) for line in (bundle / "MANIFEST.sha256").read_text().splitlines())
    files = {p.name for p in bundle.iterdir()} - {"MANIFEST.sha256"}
    assert set(listed) == files
    assert {"config.json", "weights.pt", "features.json", "vocabulary.json", "metrics.json", "README.md"} <= files
    for name, digest in listed.items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest


def test_config_and_metrics_copy_the_trial(study, bundles):
    trial = study.trials["int8"]
    config = json.loads((bundles["int8"] / "config.json").read_text())
    record = json.loads((bundles["int8"] / "metrics.json").read_text())
    assert config["format_version"] == runtime.BUNDLE_VERSION
    assert config["study"]["name"] == study.name and config["study"]["trial"] == trial.number
    arch = models.architecture("tiny")
    assert config["trial_config"] == TrialConfig.from_dict(trial.user_attrs["config"]).resolved(arch).to_dict()
    assert config["model"]["weights"] == trial.user_attrs["model"]["weights"]
    assert config["eval"] == {"set": str(study.manifest), "limit": None}
    assert record["metrics"] == dict(trial.user_attrs["metrics"],
                                     speedup_ci95=trial.user_attrs["speedup"]["speedup_ci95"])
    assert record["machine"] == trial.user_attrs["machine"]
    assert record["transcripts"] == trial.user_attrs["transcripts"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_dense_encoder_is_scripted_and_moe_says_why_not(bundles):
    dense = json.loads((bundles["int8"] / "config.json").read_text())
    assert dense["encoder_artifact"]["kind"] == "torchscript" and dense["encoder_artifact_error"] is None
    scripted = torch.jit.load(str(bundles["int8"] / dense["encoder_artifact"]["file"]))
    out, lengths, _ = scripted.infer(torch.zeros(1, 20, 80), torch.tensor([20]), None)
    assert out.shape == (1, 4, 64) and lengths.tolist() == [4]
    moe = json.loads((bundles["moe"] / "config.json").read_text())
    assert moe["encoder_artifact"] is None and "torch.jit.script" in moe["encoder_artifact_error"]
    assert "No encoder artifact" in (bundles["moe"] / "README.md").read_text()
    assert moe["moe"] == {"experts": 2, "top_k": 1, "hidden": 32, "every": 1, "layers": [0, 1]}


def test_without_torchscript_torch_export_is_tried_and_kept_only_if_it_reproduces(study, tmp_path, monkeypatch):
    def no_script(*args, **kwargs):
        raise RuntimeError("scripting unavailable")

    monkeypatch.setattr(torch.jit, "script", no_script)
    bundle = export.export_bundle(study.storage, study.name, tmp_path / "b", trial=study.trials["fp32"].number)
    config = json.loads((bundle / "config.json").read_text())
    assert "torch.jit.script: RuntimeError: scripting unavailable" in config["encoder_artifact_error"]
    assert not (bundle / "encoder.ts").exists()
    if config["encoder_artifact"] is None:  # torch 2.14 cannot serialise the Emformer's math.ceil
        assert "torch.export: " in config["encoder_artifact_error"] and not (bundle / "encoder.pt2").exists()
        return
    assert config["encoder_artifact"]["kind"] == "torch.export"
    program = torch.export.load(str(bundle / config["encoder_artifact"]["file"])).module()
    encoder = runtime.load(bundle).model.transcriber
    states = [layer._init_state(1, None) for layer in encoder.transformer.emformer_layers]
    x = torch.randn(1, 20, 80)
    assert torch.equal(program(x, torch.tensor([20]), states)[0], encoder.infer(x, torch.tensor([20]), None)[0])


# -- choosing the trial ---------------------------------------------------------------------
def test_pick_exports_the_matching_trial_with_least_rtf(study, tmp_path, capsys):
    dense_fp32_mib = study.trials["fp32"].user_attrs["metrics"]["weight_mib"]
    complete = optuna.load_study(study_name=study.name, storage=study.storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    matching = [t for t in complete if t.user_attrs["metrics"]["weight_mib"] < dense_fp32_mib]
    assert 0 < len(matching) < 4  # the condition filters
    expected = min(matching, key=lambda t: t.user_attrs["metrics"]["rtf_p95"])
    out = tmp_path / "picked"
    assert export.main(["--study", study.name, "--storage", study.storage, "--out", str(out),
                        "--pick", f"wer<=1.0, weight_mib<{dense_fp32_mib}"]) == 0
    assert json.loads((out / "config.json").read_text())["study"]["trial"] == expected.number
    assert f"exported trial {expected.number}" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    ({"pick": "wer<0.5"}, "no COMPLETE trial of study 'space' satisfies wer<0.5"),
    ({"pick": "wr<=0.5"}, "metric 'wr' is not recorded"),
    ({"pick": "wer=<0.5"}, "is not METRIC OP NUMBER"),
    ({"pick": "rtf_p95<nan"}, "'nan' is not a number"),  # nothing compares true with NaN
    ({"pick": "wer<=0.5", "minimize": "latency"}, "metric 'latency' is not recorded"),
    ({"trial": 99}, "has no trial 99"),
    ({}, "give exactly one of"),
])
def test_bad_choice_is_a_clear_error_and_writes_nothing(study, tmp_path, kwargs, message):
    with pytest.raises(DSEError, match=message):
        export.export_bundle(study.storage, study.name, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_minimize_with_a_trial_number_is_refused(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # it ranks --pick's matches: with --trial it was silently ignored
        export.main(["--storage", study.storage, "--study", study.name, "--trial", "0", "--minimize", "wer",
                     "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "nothing to rank" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_study_lists_the_studies_there(study, tmp_path):
    with pytest.raises(DSEError, match="no study 'nope'.*studies there: space"):
        export.export_bundle(study.storage, "nope", tmp_path / "out", trial=0)
    with pytest.raises(DSEError, match="not found"):
        export.export_bundle(f"sqlite:///{tmp_path}/missing.db", "space", tmp_path / "out", trial=0)
    assert list(tmp_path.iterdir()) == []


# -- adapted weights ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_adapted_trial_exports_the_cached_weights_the_study_measured(study, adapted, tmp_path):
    bundle = export.export_bundle(adapted.storage, "space", tmp_path / "b", trial=adapted.trial.number,
                                  cache_dir=str(adapted.cache))
    config = json.loads((bundle / "config.json").read_text())
    assert config["adaptation"]["source"] == "cache" and config["adaptation"]["steps"] == 2
    recognizer = runtime.load(bundle)
    assert recognizer.decoder.temperature == config["trial_config"]["temperature"] == TrialConfig().temperature
    hyps = [runtime.stream(recognizer, torch.from_numpy(soundfile.read(p, dtype="float32")[0])) for p in study.audio]
    assert hyps == [t["hyp"] for t in adapted.trial.user_attrs["transcripts"]]


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_missing_adaptation_cache_adapts_again_and_says_so(adapted, tmp_path):
    bundle = export.export_bundle(adapted.storage, "space", tmp_path / "b", trial=adapted.trial.number,
                                  cache_dir=str(tmp_path / "empty-cache"))
    assert json.loads((bundle / "config.json").read_text())["adaptation"]["source"] == "re-adapted"
    assert json.loads((bundle / "metrics.json").read_text())["adapted_again"] is True
    assert "adapted again" in (bundle / "README.md").read_text()


# -- writing atomically ---------------------------------------------------------------------
def test_failed_export_leaves_no_target_and_no_temporary(study, tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_readme", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_bundle(study.storage, study.name, tmp_path / "out", trial=study.trials["fp32"].number)
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_replaced_only_with_force(study, bundles, tmp_path):
    out = copy_bundle(bundles["int8"], tmp_path)
    trial = study.trials["fp32"].number
    with pytest.raises(DSEError, match="not empty; pass --force"):
        export.export_bundle(study.storage, study.name, out, trial=trial)
    assert json.loads((out / "config.json").read_text())["trial_config"]["precision"] == "int8"
    export.export_bundle(study.storage, study.name, out, trial=trial, force=True)
    assert json.loads((out / "config.json").read_text())["trial_config"]["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# -- loading and streaming ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_fresh_process_transcribes_the_eval_set_with_the_recorded_wer(study, bundles, kind):
    out = subprocess.run([sys.executable, "-m", "dse.transcribe", str(bundles[kind]), *map(str, study.audio)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    hyps = out.stdout.splitlines()
    trial = study.trials[kind]
    assert hyps == [t["hyp"] for t in trial.user_attrs["transcripts"]]
    assert all(hyps)  # the comparison is not vacuous
    scores = measure.score(study.refs, hyps)
    assert scores["wer"] == trial.user_attrs["metrics"]["wer"]
    assert scores["cer"] == trial.user_attrs["metrics"]["cer"]


def test_moe_bundle_rebuilds_experts_and_reproduces_transcripts(study, bundles):
    recognizer = runtime.load(bundles["moe"])
    assert len(moe_blocks(recognizer.model)) == 2
    hyps = [runtime.stream(recognizer, torch.from_numpy(soundfile.read(p, dtype="float32")[0]))
            for p in study.audio]
    assert hyps == [t["hyp"] for t in study.trials["moe"].user_attrs["transcripts"]]
    dense = [t["hyp"] for t in study.trials["fp32"].user_attrs["transcripts"]]
    assert hyps != dense  # the experts matter: a dense rebuild would not pass


def test_stdin_pcm_streams_like_the_file_with_partials(study, bundles):
    pcm = soundfile.read(study.audio[2], dtype="int16")[0].tobytes()
    out = subprocess.run([sys.executable, "-m", "dse.transcribe", str(bundles["int8"]), str(study.audio[2]), "-",
                          "--partial"], input=pcm, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    lines = out.stdout.decode().splitlines()
    finals = [i for i, line in enumerate(lines) if not line.startswith("[")]
    assert len(finals) == 2
    expected = study.trials["int8"].user_attrs["transcripts"][2]["hyp"]
    assert [lines[i] for i in finals] == [expected, expected]
    for partials in (lines[:finals[0]], lines[finals[0] + 1:finals[1]]):
        assert len(partials) >= 3
        times = [float(p[1:].split(" s]")[0]) for p in partials]
        assert times == sorted(times) and times[-1] <= 2.1
        assert partials[-1].split("] ", 1)[1] == expected


@pytest.mark.parametrize("data, message", [(b"", "no audio"), (b"\x01\x02\x03", "odd count")])
def test_bad_pcm_on_stdin_is_an_audio_error(bundles, data, message):
    import io

    with pytest.raises(AudioError, match=message):
        transcribe.stream_pcm(runtime.load(bundles["fp32"]), io.BytesIO(data))


def test_unreadable_audio_file_is_a_clear_error(bundles, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF but not really audio")
    assert transcribe.main([str(bundles["fp32"]), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.wav" in err and "unreadable" in err and "Traceback" not in err


def test_live_pieces_are_the_schedule_the_study_timed(bundles):
    recognizer = runtime.load(bundles["fp32"])
    first, step = runtime.piece_samples(recognizer)
    assert first == recognizer.logmel.config.samples_for_frames(recognizer.chunk_frames)
    assert step == recognizer.advance_frames * recognizer.logmel.config.hop_samples
    for num_samples in (1, 3000, 3360, 16000, 33333):
        pieces = runtime.live_pieces(num_samples, recognizer)
        assert pieces == recognizer.arrival_pieces(num_samples)  # the schedule dse.measure streams
        assert pieces[0] == (0, min(first, num_samples)) and pieces[-1][1] == num_samples
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert all(end - start == step for start, end in pieces[1:-1])


def test_fp32_reference_dequantises_int8_weights(bundles):
    deployed = runtime.load(bundles["int8"])
    reference = runtime.load(bundles["int8"], fp32_reference=True)
    q = deployed.model.transcriber.input_linear
    f = reference.model.transcriber.input_linear
    assert type(f) is torch.nn.Linear and f.weight.dtype == torch.float32
    assert torch.equal(f.weight, q.weight().dequantize())


# -- refusing altered bundles ---------------------------------------------------------------
@pytest.mark.parametrize("name, action, message", [
    ("weights.pt", "flip", "does not match MANIFEST.sha256"),
    ("config.json", "edit", "does not match MANIFEST.sha256"),
    ("vocabulary.json", "delete", "is missing"),
    ("MANIFEST.sha256", "delete", "manifest missing"),
])
def test_altered_or_missing_file_is_refused_by_name(bundles, tmp_path, name, action, message):
    bundle = copy_bundle(bundles["int8"], tmp_path)
    path = bundle / name
    if action == "flip":  # one bit in the middle of the weights
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif action == "edit":  # still valid JSON, only the meaning changed
        path.write_text(path.read_text().replace('"beam_width": 1', '"beam_width": 2'))
    else:
        path.unlink()
    with pytest.raises(runtime.BundleError, match=f"{name}.*{message}"):
        runtime.load(bundle)


def test_newer_bundle_format_is_refused(bundles, tmp_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path)
    config = json.loads((bundle / "config.json").read_text())
    config["format_version"] = runtime.BUNDLE_VERSION + 1
    (bundle / "config.json").write_text(json.dumps(config))
    rewrite_manifest_line(bundle, "config.json")
    with pytest.raises(runtime.BundleError, match=f"version {runtime.BUNDLE_VERSION + 1} is newer.*upgrade dse"):
        runtime.load(bundle)


# -- verify ---------------------------------------------------------------------------------
def test_verify_reproduces_wer_and_reports_speedup(bundles, capsys):
    assert verify.main([str(bundles["int8"]), "--speedup-utterances", "2"]) == 0
    out = capsys.readouterr().out
    assert "WER         recorded 1, measured 1: identical" in out
    assert "3 of 3 recorded transcripts identical" in out
    assert "over an fp32 rebuild" in out and "recorded" in out.split("speedup", 1)[1]


def test_verify_fails_when_only_the_recorded_wer_differs(bundles, tmp_path, capsys):
    bundle = copy_bundle(bundles["fp32"], tmp_path)
    record = json.loads((bundle / "metrics.json").read_text())
    record["metrics"]["wer"] = 0.5
    (bundle / "metrics.json").write_text(json.dumps(record))
    rewrite_manifest_line(bundle, "metrics.json")
    runtime.read_config(bundle)  # the manifest agrees: only the WER differs
    assert verify.main([str(bundle), "--no-speedup"]) == 1
    captured = capsys.readouterr()
    assert "WER mismatch: recorded 0.5, measured 1" in captured.err
    assert "CER mismatch" not in captured.err


def test_runtime_imports_no_study_machinery():
    code = ("import sys, dse.deploy.runtime, dse.deploy.transcribe\n"
            "heavy = ['optuna', 'streamlit', 'jiwer', 'dse.search', 'dse.training', 'dse.run', 'dse.measure',\n"
            "         'dse.core.measure']\n"
            "print(' '.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""

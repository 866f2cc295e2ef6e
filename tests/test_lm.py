"""Character n-gram language model: probabilities, files, shallow fusion, studies and bundles."""
import gzip
import json
import math
import subprocess
import sys

import optuna
import pytest
import soundfile
import torch
from torchaudio.models import RNNTBeamSearch

from conftest import tone
from dse.deploy import export
from dse.training import lm_build
from dse.core import models
from dse import run
from dse.deploy import runtime
from dse.deploy import verify
from dse.core.config import DEFAULT_LM_WEIGHT, TrialConfig
from dse.core.errors import ConfigError, DSEError, ModelLoadError
from dse.core.lm import CharNgramLM, FusedBeamSearch
from dse.core.stream import StreamingRecognizer
from dse.core.build import build_recognizer

SYMBOLS = models.CharTokenizer().symbols
TEXTS = ["the cat sat on the mat", "the cat ate the rat", "a dog sat on the log", "the mat is flat"]


@pytest.fixture(scope="module")
def small_lm():
    return CharNgramLM.train(TEXTS, SYMBOLS, order=4)


@pytest.mark.parametrize("order", [1, 2, 4])
@pytest.mark.parametrize("history", ["", "the c", "zzq", "the cat sat on the mat and"])
def test_distribution_is_normalised_after_any_history(order, history):
    lm = CharNgramLM.train(TEXTS, SYMBOLS, order=order)
    probs = lm.distribution(history).exp()
    assert probs.shape == (len(SYMBOLS) + 1,)
    assert abs(float(probs.double().sum()) - 1.0) < 1e-6
    assert float(probs.min()) > 0  # every character stays possible


def test_trained_spelling_is_more_likely_than_a_misspelling(small_lm):
    assert small_lm.log_prob("the cat sat") > small_lm.log_prob("tha cst sat") + 5
    # after "the c" the model has only seen "a" follow
    dist = small_lm.distribution("the c")
    assert int(dist.argmax()) == small_lm.vocab.index("a")
    assert small_lm.bits_per_char(TEXTS) < CharNgramLM.train(TEXTS, SYMBOLS, order=1).bits_per_char(TEXTS)


def test_save_and_load_round_trip(small_lm, tmp_path):
    path = small_lm.save(tmp_path / "x.lm.gz")
    back = CharNgramLM.load(path)
    assert (back.order, back.symbols, back.discount) == (small_lm.order, small_lm.symbols, small_lm.discount)
    assert back.info["texts"] == len(TEXTS)
    for history in ["", "the ", "xyz", "on the m"]:
        assert torch.equal(back.distribution(history), small_lm.distribution(history))


@pytest.mark.parametrize("content, message", [
    (b"not gzip at all", "unreadable language model"),
    (gzip.compress(b'{"format": "something-else"}\n'), "is not a character n-gram model"),
    (gzip.compress(b'{"format": "dse-char-ngram", "version": 99}\n'), "version 99"),
    (gzip.compress(b'{"format": "dse-char-ngram", "version": 1, "order": 2, "discount": 0.75, "symbols": ["a"]}\n'
                   b"1\tbroken line\n"), "unreadable language model"),
])
def test_bad_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.lm.gz"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        CharNgramLM.load(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        CharNgramLM.load(tmp_path / "missing.lm.gz")


def test_fused_scores_add_the_weighted_lm_to_non_blank_tokens_only(tiny, small_lm):
    plain = RNNTBeamSearch(tiny.model, tiny.tokenizer.blank)
    fused = FusedBeamSearch(tiny.model, tiny.tokenizer, small_lm, lm_weight=0.7)
    enc = torch.randn(1, 1, tiny.arch["encoding_dim"])
    hypos = plain._init_b_hypos(torch.device("cpu"))
    history_tokens = tiny.tokenizer.encode("the c")
    hypos = [(hypos[0][0] + history_tokens,) + hypos[0][1:]]
    base = plain._gen_next_token_probs(enc, hypos, torch.device("cpu"))
    got = fused._gen_next_token_probs(enc, hypos, torch.device("cpu"))
    lm_scores = small_lm.distribution("the c")[: len(SYMBOLS)]  # symbol i of the LM is token i here
    assert torch.allclose(got[0, :-1], base[0, :-1] + 0.7 * lm_scores, atol=1e-6)
    assert got[0, -1] == base[0, -1]  # the blank


@pytest.mark.parametrize("text", ["", "t", "the", "the c", "the ca", "the cat", "the cat s", "the cat sat on"])
def test_fusion_reads_the_same_history_at_every_length(tiny, text):
    # order 8: histories shorter than, equal to and longer than the 7 characters that matter
    lm = CharNgramLM.train(TEXTS, SYMBOLS, order=8)
    fused = FusedBeamSearch(tiny.model, tiny.tokenizer, lm, lm_weight=0.7)
    tokens = [tiny.tokenizer.blank] + tiny.tokenizer.encode(text)
    expected = 0.7 * lm.distribution(text)[: len(SYMBOLS)]
    assert torch.equal(fused._lm_scores(tokens), expected)


def test_weight_zero_is_plain_beam_search(tiny, small_lm):
    audio = torch.from_numpy(tone(2.0, seed=3))
    plain = StreamingRecognizer.from_loaded(tiny, beam_width=3, search="torchaudio")
    off = StreamingRecognizer.from_loaded(tiny, beam_width=3, search="torchaudio", lm=small_lm, lm_weight=0.0)
    assert type(off.decoder) is RNNTBeamSearch
    assert plain.transcribe(audio) == off.transcribe(audio)
    on = StreamingRecognizer.from_loaded(tiny, beam_width=3, lm=small_lm, lm_weight=1.0, search="torchaudio")
    assert isinstance(on.decoder, FusedBeamSearch)


def test_fusion_needs_a_character_tokenizer_the_lm_covers(tiny, small_lm):
    base = models.random_model("base")
    with pytest.raises(DSEError, match="needs a character tokenizer"):
        FusedBeamSearch(base.model, base.tokenizer, small_lm, 0.5)
    letters_only = CharNgramLM.train(TEXTS, list("abcdefghijklmnopqrstuvwxyz "), order=2)
    with pytest.raises(DSEError, match="does not cover the symbols \\[\"'\"\\]"):
        FusedBeamSearch(tiny.model, tiny.tokenizer, letters_only, 0.5)


@pytest.mark.parametrize("value, message", [(-0.1, "must be a number in"), (4.5, "must be a number in"),
                                            (True, "must be a number in"), ("0.3", "must be a number in")])
def test_lm_weight_is_validated(value, message):
    with pytest.raises(ConfigError, match=f"lm_weight={value!r} {message}"):
        TrialConfig(lm_weight=value)
    assert TrialConfig(lm_weight=1).lm_weight == 1.0 and isinstance(TrialConfig(lm_weight=1).lm_weight, float)


def test_build_without_a_language_model_says_how_to_get_one(tiny):
    with pytest.raises(ConfigError, match="needs a character language model.*--lm FILE"):
        build_recognizer(tiny, TrialConfig(lm_weight=0.3, beam_width=2, threads=1))


def test_checkpoint_brings_the_language_model_beside_it(tiny, small_lm, tmp_path):
    models.save_checkpoint(tmp_path / "m.pt", tiny)
    assert models.load_checkpoint(tmp_path / "m.pt").lm_path is None
    small_lm.save(tmp_path / "m.lm.gz")
    loaded = models.load_checkpoint(tmp_path / "m.pt")
    assert loaded.lm_path == str(tmp_path / "m.lm.gz")
    built = build_recognizer(loaded, TrialConfig(lm_weight=0.3, beam_width=2, threads=1))
    assert isinstance(built.recognizer.decoder.lm, CharNgramLM)
    assert built.recognizer.decoder.lm_weight == 0.3  # fused (the vectorised search, dse.core.decoder)
    with pytest.raises(ModelLoadError, match="not found"):
        models.with_lm(loaded, str(tmp_path / "nope.lm.gz"))


def test_default_model_ships_an_lm_counted_from_the_training_texts_only():
    if not models.default_available():
        pytest.skip("no embedded default model")
    path = models.lm_beside(models.DEFAULT_CHECKPOINT)
    assert models.load_model().lm_path == str(path)
    shipped = CharNgramLM.load(path)
    try:
        texts = lm_build.default_texts()
    except DSEError as exc:
        pytest.skip(str(exc))  # the fortune packages are not installed
    from dse.training.corpus import shipped_texts

    held_eval, held_adapt = shipped_texts()
    assert held_eval and held_adapt and not (set(texts) & (held_eval | held_adapt))
    # Not even inside a longer sentence.
    held = [f" {h} " for h in held_eval | held_adapt]
    assert not [t for t in texts if any(h in f" {t} " for h in held)]
    # the shipped file was counted from exactly these texts: rebuilding it is reproducible
    rebuilt = CharNgramLM.train(texts, SYMBOLS, order=shipped.order)
    assert shipped.info["sha256_of_texts"] == rebuilt.info["sha256_of_texts"]
    assert shipped.info["texts"] == len(texts)


def test_cli_builds_and_scores(tmp_path, capsys):
    manifest = tmp_path / "t.jsonl"
    manifest.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "x.lm.gz"
    assert lm_build.main(["build", "--out", str(out), "--order", "3", "--texts", str(manifest)]) == 0
    assert "order 3, 4 sentences" in capsys.readouterr().out
    assert lm_build.main(["score", str(out), str(manifest)]) == 0
    bits = float(capsys.readouterr().out.split(": ")[1].split()[0])
    assert 0 < bits < math.log2(len(SYMBOLS) + 1)
    assert lm_build.main(["build", "--out", str(tmp_path / "y.lm.gz"), "--texts", str(tmp_path / "none.txt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_refuses_what_it_cannot_count_or_must_not_overwrite(tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)))
    (tmp_path / "empty.txt").write_text("")
    victim = tmp_path / "victim.wav"
    victim.write_bytes(b"RIFF....WAVE")
    (tmp_path / "folder").mkdir()
    lm = tmp_path / "x.lm.gz"
    assert lm_build.main(["build", "--out", str(lm), "--order", "3", "--texts", str(texts)]) == 0
    capsys.readouterr()
    for args, message in [
        (["--out", str(victim)], "exists; pass --force"),
        (["--out", str(victim), "--force"], "is not a dse language model"),  # --force replaces only an LM
        (["--out", str(lm)], "exists; pass --force"),
        (["--out", str(tmp_path / "folder")], "is a directory"),
        (["--out", str(victim / "x.lm.gz")], "victim.wav is not a folder"),
        (["--out", ""], "--out is empty"),
        (["--out", str(tmp_path / "n.lm.gz"), "--order", "0"], "--order 0"),
        (["--out", str(tmp_path / "n.lm.gz"), "--texts", str(tmp_path / "binary.txt")], "is not UTF-8 text"),
        (["--out", str(tmp_path / "n.lm.gz"), "--texts", str(tmp_path / "empty.txt")], "no sentences"),
        (["--out", str(tmp_path / "n.lm.gz"), "--texts", str(tmp_path / "folder")], "is a directory"),
    ]:
        argv = ["build", *args] if "--texts" in args else ["build", *args, "--texts", str(texts)]
        assert lm_build.main(argv) == 2, args
        assert message in capsys.readouterr().err, args
    assert victim.read_bytes() == b"RIFF....WAVE"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "empty.txt", "folder", "t.txt", "victim.wav",
                                                           "x.lm.gz"]  # nothing half-written beside them
    assert lm_build.main(["build", "--out", str(lm), "--order", "2", "--texts", str(texts), "--force"]) == 0
    assert CharNgramLM.load(lm).order == 2
    assert lm_build.main(["score", str(lm), str(tmp_path / "empty.txt")]) == 2
    assert "no sentences" in capsys.readouterr().err


# -- a study that fuses the LM, exported and served ------------------------------------------
SPACE = """\
model: {checkpoint}
sampler: grid
n_trials: 3
objectives: [{{metric: wer, direction: minimize}}, {{metric: rtf_p95, direction: minimize}}]
params: {{lm_weight: {{choices: [0.0, 0.8]}}}}
fixed: {{beam_width: 2, threads: 1}}
timing_utterances: 2
"""


@pytest.fixture(scope="module")
def fused_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmstudy")
    rows = []
    for i, secs in enumerate([1.1, 1.7]):
        soundfile.write(root / f"u{i}.wav", tone(secs, freq=180 + 60 * i, seed=i), 16000)
        rows.append({"path": f"u{i}.wav", "text": "the cat sat"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = root / "tiny.pt"
    models.save_checkpoint(checkpoint, models.random_model("tiny", seed=1))
    lm_file = CharNgramLM.train(TEXTS, SYMBOLS, order=3).save(root / "other.lm.gz")
    (root / "space.yaml").write_text(SPACE.format(checkpoint=checkpoint))
    storage = f"sqlite:///{root}/s.db"
    assert run.main(["--study", str(root / "space.yaml"), "--storage", storage, "--eval-set", str(manifest),
                     "--model", str(checkpoint), "--lm", str(lm_file)]) == 0
    study = optuna.load_study(study_name="space", storage=storage)
    trials = {t.user_attrs["config"]["lm_weight"]: t  # the baseline (the default weight) is a trial too
              for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("anchor") is None}
    assert set(trials) == {0.0, 0.8}
    return root, storage, trials, lm_file


def test_study_records_the_language_model_it_fused(fused_study):
    root, storage, trials, lm_file = fused_study
    model = trials[0.8].user_attrs["model"]
    assert model["lm"] == str(lm_file) and model["lm_sha256"] == runtime.sha256_file(lm_file)


def test_bundle_carries_the_lm_and_streams_what_the_study_measured(fused_study, tmp_path, capsys):
    root, storage, trials, lm_file = fused_study
    trial = trials[0.8]
    bundle = export.export_bundle(storage, "space", tmp_path / "b", trial=trial.number)
    config = runtime.read_config(bundle)
    assert config["language_model"]["file"] == runtime.LM_FILE and config["language_model"]["weight"] == 0.8
    assert runtime.sha256_file(bundle / runtime.LM_FILE) == runtime.sha256_file(lm_file)
    assert runtime.LM_FILE in (bundle / runtime.MANIFEST_FILE).read_text()
    recognizer = runtime.load(bundle)
    assert isinstance(recognizer.decoder.lm, CharNgramLM) and recognizer.decoder.lm.order == 3
    out = subprocess.run([sys.executable, "-m", "dse.transcribe", str(bundle), str(root / "u0.wav"),
                          str(root / "u1.wav")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [t["hyp"] for t in trial.user_attrs["transcripts"]]
    assert runtime.load(bundle, lm_weight=0.0).decoder.lm is None  # weight 0: no fusion
    # the speedup reference is the study's baseline: a model with an LM has its default weight there
    assert verify.main([str(bundle), "--speedup-utterances", "2"]) == 0
    report = capsys.readouterr().out
    assert f"over an fp32 rebuild with beam width 2, LM weight {DEFAULT_LM_WEIGHT:g}" in report
    assert "accuracy identical" in report
    (bundle / runtime.LM_FILE).unlink()
    with pytest.raises(runtime.BundleError, match=runtime.LM_FILE):
        runtime.load(bundle)


def test_export_refuses_an_lm_changed_since_the_study(fused_study, tmp_path):
    root, storage, trials, lm_file = fused_study
    saved = lm_file.read_bytes()
    try:
        CharNgramLM.train(["something else entirely"], SYMBOLS, order=3).save(lm_file)
        with pytest.raises(DSEError, match="changed since trial"):
            export.export_bundle(storage, "space", tmp_path / "b", trial=trials[0.8].number)
    finally:
        lm_file.write_bytes(saved)
    bundle = export.export_bundle(storage, "space", tmp_path / "plain", trial=trials[0.0].number)
    assert not (bundle / runtime.LM_FILE).exists() and runtime.read_config(bundle)["language_model"] is None
    with pytest.raises(runtime.BundleError, match="the trial fused no language model"):
        runtime.load(bundle, lm_weight=0.5)


def test_a_study_fuses_the_models_lm_by_default_and_says_when_its_baseline_changed(tmp_path, manifest, capsys,
                                                                                     monkeypatch):
    monkeypatch.setenv("DSE_LOCK_DIR", str(tmp_path))
    checkpoint = tmp_path / "tiny.pt"
    models.save_checkpoint(checkpoint, models.random_model("tiny", seed=0))
    (tmp_path / "space.yaml").write_text(
        f"model: {checkpoint}\nsampler: grid\nn_trials: 1\n"
        "objectives: [{metric: wer, direction: minimize}, {metric: rtf_p95, direction: minimize}]\n"
        "params: {precision: {choices: [fp32, int8]}}\nfixed: {beam_width: 2, threads: 1}\ntiming_utterances: 2\n")
    storage = f"sqlite:///{tmp_path}/s.db"
    argv = ["--study", str(tmp_path / "space.yaml"), "--storage", storage, "--eval-set", str(manifest)]
    assert run.main(argv) == 0  # no LM beside the checkpoint: no fusion
    study = optuna.load_study(study_name="space", storage=storage)
    assert study.user_attrs["baseline_config"]["lm_weight"] == 0.0
    assert [t.user_attrs["config"]["lm_weight"] for t in study.trials] == [0.0]
    assert "baseline changed" not in capsys.readouterr().err
    CharNgramLM.train(TEXTS, SYMBOLS, order=3).save(tmp_path / "tiny.lm.gz")  # now the model carries one
    assert run.main(argv + ["--n-trials", "2"]) == 0
    study = optuna.load_study(study_name="space", storage=storage)
    assert study.user_attrs["baseline_config"]["lm_weight"] == DEFAULT_LM_WEIGHT
    assert [t.user_attrs["config"]["lm_weight"] for t in study.trials] == [0.0, DEFAULT_LM_WEIGHT]
    assert f"lm_weight 0.0 -> {DEFAULT_LM_WEIGHT}" in capsys.readouterr().err

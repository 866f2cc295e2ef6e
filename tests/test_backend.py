"""The encoder backend knob (torch | onnxruntime), compile-once, the load check, and ONNX bundles.

Tiny architecture throughout; every ONNX export of this module goes to one cache folder
(``$DSE_ONNX_CACHE``), so a configuration is exported once and later builds hit the cache.
"""
import itertools
import json
import os
import subprocess
import sys
import time
import types

import optuna
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import tone, write_tones  # noqa: E402
from dse import run  # noqa: E402
from dse.core import measure, models  # noqa: E402
from dse.core.build import TrialFailed, build_recognizer  # noqa: E402
from dse.core.config import CONFIG_VERSION, TrialConfig  # noqa: E402
from dse.core.errors import ConfigError  # noqa: E402
from dse.deploy import export, runtime, verify  # noqa: E402
from dse.search.space import load_space  # noqa: E402

ORT = {"backend": "onnxruntime", "beam_width": 1, "threads": 1}

# Computed before the backend knob existed: a knob added later must not change them.
KEYS_BEFORE_BACKEND = {
    "key": "1165e82f67bee66e", "accuracy_key": "ae8c5d47135f4213", "weights_key": "e7c3a182cf9faf19",
    "int8_greedy_key": "26c5c4b5cace9c49"}


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    """One export cache for the module; one torch thread (tiny ops: a second thread only waits)."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSE_ONNX_CACHE", str(cache))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield cache
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model():
    return models.random_model("tiny", seed=0)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Three short utterances (tones) as the eval set."""
    manifest = write_tones(tmp_path_factory.mktemp("audio"))
    return types.SimpleNamespace(manifest=manifest, eval=measure.load_eval_audio(manifest))


# -- the knob and its keys ------------------------------------------------------------------
def test_keys_of_configurations_from_before_the_knob_are_unchanged():
    default = TrialConfig()
    assert default.key() == KEYS_BEFORE_BACKEND["key"]
    assert default.accuracy_key() == KEYS_BEFORE_BACKEND["accuracy_key"]
    assert default.weights_key() == KEYS_BEFORE_BACKEND["weights_key"]
    assert TrialConfig(precision="int8", beam_width=1).key() == KEYS_BEFORE_BACKEND["int8_greedy_key"]
    # a version-2 configuration reads as backend torch, with the key it had
    old = {k: v for k, v in default.to_dict().items() if k != "backend"}
    assert TrialConfig.from_dict(dict(old, version=2)) == default
    assert default.to_dict()["version"] == CONFIG_VERSION == 3 and default.backend == "torch"


def test_onnxruntime_changes_the_key_and_the_accuracy_key_not_the_weights_key():
    ort, torch_ = TrialConfig(backend="onnxruntime"), TrialConfig()
    assert ort.key() != torch_.key() and ort.accuracy_key() != torch_.accuracy_key()
    assert ort.weights_key() == torch_.weights_key()
    assert TrialConfig.from_json(ort.to_json()) == ort


@pytest.mark.parametrize("precision", ["bf16", "fp16", "amp-bf16", "amp-fp16"])
def test_onnxruntime_takes_fp32_or_int8_only(precision):
    with pytest.raises(ConfigError, match=f"^precision {precision} is not available with backend onnxruntime; "
                                          "use fp32 or int8$"):
        TrialConfig(backend="onnxruntime", precision=precision)


def test_onnxruntime_refuses_compile():
    with pytest.raises(ConfigError, match="compile default is not available with backend onnxruntime"):
        TrialConfig(backend="onnxruntime", compile="default")


@pytest.mark.parametrize("name", ["precision", "base-latency"])
def test_every_combination_of_the_spaces_that_search_the_backend_validates(name):
    space = load_space(name).for_model(True)
    assert any(p.knob == "backend" and set(p.values()) == {"torch", "onnxruntime"} for p in space.params)
    names = [p.knob for p in space.params]
    for combo in itertools.product(*(p.values() for p in space.params)):
        space._filled(dict(space.fixed, **dict(zip(names, combo))))  # raises ConfigError for a bad one
    assert len(space.configurations()) == space.grid_size()


# -- building and streaming -----------------------------------------------------------------
def test_onnxruntime_trial_streams_the_transcripts_of_torch_fp32(tiny_model, audio):
    ort = build_recognizer(tiny_model, TrialConfig(**ORT))
    ref = build_recognizer(tiny_model, TrialConfig(beam_width=1, threads=1))
    assert type(ort.recognizer.model.transcriber).__name__ == "OrtTranscriber"
    assert ort.export_s is not None and ref.export_s is None and ort.export_info["precision"] == "fp32"
    a = measure.measure(ort.recognizer, audio.eval)
    b = measure.measure(ref.recognizer, audio.eval)
    assert [t["hyp"] for t in a["transcripts"]] == [t["hyp"] for t in b["transcripts"]]
    assert any(t["hyp"] for t in a["transcripts"])  # something was decoded
    assert a["wer"] == b["wer"]
    assert a["threading"]["ort_threads"] == 1 and a["threading"]["ort_decoder_threads"] == 1
    assert a["threading"]["ort_spinning"] is (os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE")
    assert b["threading"]["ort_threads"] is None and b["threading"]["ort_decoder_threads"] is None
    assert a["threading"]["omp_wait_policy"]


def test_second_build_of_a_configuration_hits_the_export_cache(tiny_model):
    first = build_recognizer(tiny_model, TrialConfig(**ORT))  # exported here or by the test above
    again = build_recognizer(tiny_model, TrialConfig(**ORT))
    assert again.export_info["hit"] is True and again.export_s == 0.0
    assert again.export_info["path"] == first.export_info["path"]
    # knobs that leave the weights and geometry alone share the export; the geometry does not
    assert build_recognizer(tiny_model, TrialConfig(**dict(ORT, beam_width=2))).export_info["hit"] is True
    other = build_recognizer(tiny_model, TrialConfig(**dict(ORT, right_context_frames=8)))
    assert other.export_info["hit"] is False and other.export_info["path"] != first.export_info["path"]
    # other weights (another seed) are another model
    other_seed = build_recognizer(models.random_model("tiny", seed=1), TrialConfig(**ORT))
    assert other_seed.export_info["key"] != first.export_info["key"]


def test_int8_onnxruntime_quantises_encoder_predictor_and_joiner(tiny_model, audio):
    from dse.core.onnx_decoder import OrtJoiner, OrtPredictor
    built = build_recognizer(tiny_model, TrialConfig(**dict(ORT, precision="int8")))
    fp32 = build_recognizer(tiny_model, TrialConfig(**ORT))
    assert built.export_info["precision"] == "int8" and built.export_info["quantized_ops"]
    decoder, decoder32 = built.export_info["decoder"], fp32.export_info["decoder"]
    assert decoder["precision"] == "int8" and decoder["bytes"] < decoder32["bytes"] / 2
    model = built.recognizer.model
    assert isinstance(model.predictor, OrtPredictor) and isinstance(model.joiner, OrtJoiner)
    assert "int8" in model.joiner.path.name and "fp32" in fp32.recognizer.model.joiner.path.name
    assert not list(model.parameters())  # nothing of the network is left in torch
    assert measure.measure(built.recognizer, audio.eval, accuracy=False)["chunks"] > 0


def test_moe_with_onnxruntime_fails_with_the_exporters_reason(tiny_model):
    config = TrialConfig(**dict(ORT, moe_experts=2, moe_top_k=1))
    with pytest.raises(TrialFailed, match=r"backend onnxruntime cannot run this configuration: ONNX export of the "
                                          r"encoder failed: .*data-dependent.*moe\.py:\d+"):
        build_recognizer(tiny_model, config)


# -- torch.compile compiles once --------------------------------------------------------------
# fp32: the static-shape step, one graph for the first chunk (no state yet) and one for the rest
STATIC_COMPILE_GRAPHS = 2
# int8 (quantised Linear layers: torchaudio's infer): tiny compiles 19, split where torchaudio calls .item()
MAX_COMPILE_GRAPHS = 24


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compile_compiles_the_steady_state_once(tiny_model, precision):
    built = build_recognizer(tiny_model, TrialConfig(beam_width=1, threads=1, compile="default", precision=precision))
    eager = build_recognizer(tiny_model, TrialConfig(beam_width=1, threads=1, precision=precision)).recognizer
    assert built.compile_s > 0
    if precision == "fp32":
        assert built.compile_graphs == STATIC_COMPILE_GRAPHS
    else:
        assert 0 < built.compile_graphs <= MAX_COMPILE_GRAPHS
    seven_s = torch.from_numpy(tone(7.0, seed=3))  # 7 s / 160 ms per chunk: 44 chunks, 40 after the state fills
    long = measure.EvalAudio(["long"], [seven_s], ["x"], [""], [])
    result = measure.measure(built.recognizer, long, accuracy=False, warmup=False)
    assert result["chunks"] >= 44 and result["recompiles"] == 0
    assert built.recognizer.transcribe(seven_s) == eager.transcribe(seven_s)


def test_compiled_chunks_match_eager_from_the_first(tiny_model):
    compiled = build_recognizer(tiny_model, TrialConfig(beam_width=1, threads=1, compile="default"))
    infer = compiled.recognizer.model.transcriber.infer
    reference = tiny_model.model.transcriber.infer
    xs = torch.randn(12, 1, compiled.recognizer.chunk_frames, 80, generator=torch.Generator().manual_seed(0))
    length, a, b = torch.tensor([xs.size(2)]), None, None
    with torch.inference_mode():
        for x in xs:
            out, _, a = infer(x, length, a)
            ref, _, b = reference(x, length, b)
            assert torch.allclose(out, ref, atol=1e-5)
            assert all(torch.equal(sa[3], sb[3]) for sa, sb in zip(a, b))


# -- the machine's load -------------------------------------------------------------------------
def test_a_busy_neighbour_is_detected_and_named():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with measure.OtherCpuLoad() as load:
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    assert load.other_cores > measure.LOAD_WARN_CORES
    assert load.warning.startswith(f"the machine was busy: another process used {load.other_cores:.2f} cores "
                                   "during the timed pass; time again on a quiet machine")


def test_measure_reports_the_load_and_the_threads(tiny_model, audio):
    result = measure.measure(build_recognizer(tiny_model, TrialConfig(beam_width=1, threads=1)).recognizer,
                             audio.eval, accuracy=False)
    assert result["other_cpu_load"] >= 0 and (result["load_warning"] is None) == (
        result["other_cpu_load"] <= measure.LOAD_WARN_CORES)
    assert result["threading"]["torch_threads"] == 1 and result["recompiles"] == 0
    assert "omp_wait_policy" in measure.machine_fingerprint()


# -- bundles ------------------------------------------------------------------------------------
SPACE = """\
model: {checkpoint}
sampler: grid
n_trials: 2
objectives: [{{metric: wer, direction: minimize}}, {{metric: rtf_p95, direction: minimize}}]
params: {{backend: {{choices: [onnxruntime]}}, precision: {{choices: [int8]}}}}
fixed: {{beam_width: 1, threads: 1}}
timing_utterances: 2
"""


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory, audio):
    """A study of one ONNX Runtime int8 trial (and its torch fp32 baseline) of a tiny checkpoint, exported."""
    root = tmp_path_factory.mktemp("study")
    checkpoint = root / "tiny.pt"
    models.save_checkpoint(checkpoint, models.random_model("tiny"))
    space = root / "space.yaml"
    space.write_text(SPACE.format(checkpoint=checkpoint))
    storage = f"sqlite:///{root}/s.db"
    assert run.main(["--study", str(space), "--storage", storage, "--eval-set", str(audio.manifest),
                     "--model", str(checkpoint)]) == 0
    study = optuna.load_study(study_name="space", storage=storage)
    trial = next(t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                 if t.user_attrs["config"]["backend"] == "onnxruntime")
    bundle = export.export_bundle(storage, "space", root / "bundle", trial=trial.number)
    return types.SimpleNamespace(path=bundle, trial=trial)


def test_onnx_bundle_holds_the_encoder_the_trial_ran(ort_bundle):
    config = json.loads((ort_bundle.path / "config.json").read_text())
    art = config["encoder_artifact"]
    assert art["kind"] == "onnx" and art["precision"] == "int8" and config["trial_config"]["backend"] == "onnxruntime"
    onnx = ort_bundle.path / art["file"]
    listed = dict(reversed(line.split("  ")) for line in (ort_bundle.path / "MANIFEST.sha256").read_text().splitlines())
    assert listed[art["file"]] == art["sha256"] == runtime.sha256_file(onnx)
    recognizer = runtime.load(ort_bundle.path)
    assert type(recognizer.model.transcriber).__name__ == "OrtTranscriber"
    assert recognizer.model.transcriber.path == onnx
    for name in ("predictor", "joiner"):  # the predictor and joiner the trial ran, in ONNX Runtime too
        entry = art["decoder"][name]
        assert listed[entry["file"]] == entry["sha256"] == runtime.sha256_file(ort_bundle.path / entry["file"])
        assert getattr(recognizer.model, name).path == ort_bundle.path / entry["file"]
    assert recognizer.model.transcriber.spinning is (os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE")
    assert "ONNX Runtime" in (ort_bundle.path / "README.md").read_text()


def test_onnx_bundle_verifies_exactly(ort_bundle, capsys):
    assert verify.main([str(ort_bundle.path), "--speedup-utterances", "2"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "DIFFERENT" not in out and "3 of 3 recorded transcripts identical" in out
    assert "over an fp32 rebuild" in out


@pytest.mark.parametrize("file", ["encoder.onnx", "predictor.onnx", "joiner.onnx"])
def test_onnx_bundle_with_a_tampered_network_is_refused(ort_bundle, tmp_path, file):
    import shutil

    bundle = shutil.copytree(ort_bundle.path, tmp_path / "tampered")
    onnx = bundle / file
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    name = file.replace(".", "\\.")
    with pytest.raises(runtime.BundleError, match=rf"{name}: sha256 .* does not match MANIFEST\.sha256"):
        runtime.load(bundle)
    # the manifest rewritten to match: config.json's record still refuses it
    digest = runtime.sha256_file(onnx)
    lines = [f"{digest}  {file}" if line.endswith(f"  {file}") else line
             for line in (bundle / "MANIFEST.sha256").read_text().splitlines()]
    (bundle / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")
    with pytest.raises(runtime.BundleError, match=rf"{name}: sha256 .* does not match config\.json"):
        runtime.load(bundle)
    assert verify.main([str(bundle), "--no-speedup"]) == 2


def test_onnx_bundle_refuses_compile(ort_bundle):
    with pytest.raises(runtime.BundleError, match="runs in ONNX Runtime; compile applies to a torch encoder"):
        runtime.load(ort_bundle.path, compile=True)


def test_each_recognizer_runs_with_its_own_torch_threads(tiny_model, audio):
    """torch's thread count is per process: recognizers timed side by side (a 1-thread
    candidate against a 2-thread baseline) each set their own when they decode, and beside an
    ONNX Runtime encoder torch keeps 1 (its own pool has the configured threads)."""
    one = build_recognizer(tiny_model, TrialConfig(beam_width=1, threads=1)).recognizer
    two = build_recognizer(tiny_model, TrialConfig(beam_width=1, threads=2)).recognizer
    ort = build_recognizer(tiny_model, TrialConfig(**dict(ORT, threads=2))).recognizer
    assert (one.threads, two.threads, ort.threads, ort.model.transcriber.threads) == (1, 2, 1, 2)
    before = torch.get_num_threads()
    try:
        wave = audio.eval.waveforms[0]
        for rec, want in ((one, 1), (two, 2), (ort, 1), (two, 2)):
            rec.transcribe(wave)
            assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


# -- the runtime without torch --------------------------------------------------------------------
def test_lite_runtime_transcribes_like_the_torch_runtime(ort_bundle, audio):
    from dse.deploy import lite
    from dse.core.features import FeatureConfig, LogMel

    torch_rec = runtime.load(ort_bundle.path)
    rec = lite.load(ort_bundle.path)
    for wave in audio.eval.waveforms:
        samples = wave.numpy()
        want = torch_rec.logmel(wave).numpy()
        got = rec.logmel(samples)
        assert got.shape == want.shape and abs(got - want).max() < 1e-3  # numpy's FFT and float32 arithmetic
        assert rec.transcribe(samples) == torch_rec.transcribe(wave)
    assert any(rec.transcribe(w.numpy()) for w in audio.eval.waveforms)  # something was decoded
    assert isinstance(torch_rec.logmel, LogMel) and rec.logmel.n_mels == FeatureConfig().n_mels


def test_lite_runtime_runs_with_torch_unimportable(ort_bundle, audio, tmp_path):
    """The process cannot import torch or torchaudio at all: onnxruntime and numpy are enough."""
    import numpy as np

    np.save(tmp_path / "wave.npy", audio.eval.waveforms[0].numpy())
    script = ("import sys; sys.modules['torch'] = None; sys.modules['torchaudio'] = None\n"
              "import numpy as np\n"
              "from dse.deploy import lite\n"
              f"print(lite.load({str(ort_bundle.path)!r}).transcribe(np.load({str(tmp_path / 'wave.npy')!r})))\n"
              "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == runtime.load(ort_bundle.path).transcribe(audio.eval.waveforms[0])


def rewrite_config(bundle, **trial_changes):
    """Change the bundle's trial configuration and sign the new config.json into its manifest."""
    import hashlib

    config = json.loads((bundle / "config.json").read_text())
    config["trial_config"].update(trial_changes)
    (bundle / "config.json").write_text(json.dumps(config))
    digest = hashlib.sha256((bundle / "config.json").read_bytes()).hexdigest()
    lines = [f"{digest}  config.json" if line.endswith("  config.json") else line
             for line in (bundle / "MANIFEST.sha256").read_text().splitlines()]
    (bundle / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")
    return config


def with_lm(bundle, config):
    """Put a small character LM into the bundle as export does for a trial that fused one."""
    import hashlib

    from dse.core.ngram import CharNgramLM

    texts = ["the cat sat on the mat", "a dog sat on the log", "she said it was the last one"]
    path = CharNgramLM.train(texts, models.CharTokenizer().symbols, order=4).save(bundle / runtime.LM_FILE)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    config["language_model"] = {"file": runtime.LM_FILE, "order": 4, "weight": 0.3, "sha256": digest}
    (bundle / "config.json").write_text(json.dumps(config))
    (bundle / "MANIFEST.sha256").write_text((bundle / "MANIFEST.sha256").read_text() + f"{digest}  {runtime.LM_FILE}\n")
    rewrite_config(bundle)


def test_lite_runtime_refuses_what_needs_torch(ort_bundle, tmp_path):
    import shutil

    from dse.deploy import lite

    bundle = shutil.copytree(ort_bundle.path, tmp_path / "beam")
    config = json.loads((bundle / "config.json").read_text())
    config["trial_config"].update(beam_width=4, lm_weight=0.3)
    (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(lite.LiteError, match=r"config\.json: missing, or its sha256 does not match"):
        lite.load(bundle)
    rewrite_config(bundle, beam_width=4, lm_weight=0.3)  # LM fusion, but no LM file in the bundle
    with pytest.raises(lite.LiteError, match=r"needs the torch runtime .*language-model fusion without"):
        lite.load(bundle)


@pytest.mark.parametrize("beam_width,lm_weight", [(4, 0.0), (4, 0.3), (1, 0.05)])
def test_lite_runtime_runs_beam_search_and_lm_fusion_like_the_torch_runtime(ort_bundle, audio, tmp_path,
                                                                               beam_width, lm_weight):
    """A bundle with beam search and a fused LM: the torch-free runtime's transcripts are the torch runtime's."""
    import shutil

    from dse.deploy import lite

    bundle = shutil.copytree(ort_bundle.path, tmp_path / "beam")
    config = rewrite_config(bundle, beam_width=beam_width, lm_weight=lm_weight)
    if lm_weight:
        with_lm(bundle, config)
    torch_rec, rec = runtime.load(bundle), lite.load(bundle)
    assert type(rec.search).__name__ == "OrtBeamSearch" and rec.beam_width == beam_width
    numpy_logmel = rec.logmel
    # torch's front end (numpy's FFT rounds differently in near-silent frames: see dse/deploy/lite.py),
    # so that what is compared is the encoder and the search
    rec.logmel = TorchFrontEnd(numpy_logmel, torch_rec.logmel)
    texts = [rec.transcribe(w.numpy()) for w in audio.eval.waveforms]
    assert texts == [torch_rec.transcribe(w) for w in audio.eval.waveforms]
    assert any(texts)


class TorchFrontEnd:
    """The lite runtime's front end with torch's features in place of numpy's."""

    def __init__(self, numpy_logmel, torch_logmel):
        self.config, self.hop, self.n_mels = numpy_logmel.config, numpy_logmel.hop, numpy_logmel.n_mels
        self.sample_rate, self._torch = numpy_logmel.sample_rate, torch_logmel

    def __call__(self, samples):
        return self._torch(torch.from_numpy(samples)).numpy()


def test_verify_scores_the_lite_runtime_against_the_record(ort_bundle, capsys):
    assert verify.main([str(ort_bundle.path), "--no-speedup", "--lite"]) == 0
    out = capsys.readouterr().out
    assert "lite        torch-free runtime (onnxruntime + numpy): WER" in out
    assert "recorded" in out and "paired bootstrap" in out and "3 of 3 recorded transcripts identical" in out
    assert "runs without torch" in (ort_bundle.path / "README.md").read_text()  # the bundle says so

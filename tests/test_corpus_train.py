import dataclasses
import math
import random
import shutil

import pytest
import torch
import torchaudio

from dse.training import corpus
from dse.core import models
from dse.training import train


def test_sentence_splits_are_disjoint_and_seeded(tmp_path):
    if not corpus.FORTUNE_DIRS or not any(__import__("os").path.isdir(d) for d in corpus.FORTUNE_DIRS):
        pytest.skip("the Debian fortunes packages are not installed")
    try:
        jobs = corpus.plan(tmp_path, seed=3, n_train=40, n_adapt=10, n_eval_per_slice=3)
    except Exception as exc:
        pytest.skip(f"no corpus sources here: {exc}")
    again = corpus.plan(tmp_path, seed=3, n_train=40, n_adapt=10, n_eval_per_slice=3)
    assert jobs == again
    text = {s: {j.text for j in jobs if j.split == s} for s in ("train", "adapt", "eval")}
    assert not text["eval"] & text["train"] and not text["eval"] & text["adapt"]
    held = {(j.engine, j.voice) for j in jobs if j.split != "eval"}
    assert not held & corpus.HELD_OUT_VOICES


def test_voice_seed_keeps_the_sentence_split(tmp_path):
    try:
        base = corpus.plan(tmp_path, seed=3, n_train=40, n_adapt=10, n_eval_per_slice=3)
        other = corpus.plan(tmp_path, seed=3, n_train=40, n_adapt=10, n_eval_per_slice=3, voice_seed=9)
    except Exception as exc:
        pytest.skip(f"no corpus sources here: {exc}")
    for split in ("train", "adapt", "eval"):
        assert {j.text for j in base if j.split == split} == {j.text for j in other if j.split == split}
    assert [j.voice for j in base] != [j.voice for j in other]


def test_wordfreq_text_is_seeded_dictionary_words_and_never_a_shipped_sentence(tmp_path):
    pytest.importorskip("wordfreq", reason="pip install wordfreq (the 'corpus' extra) for --text wordfreq")
    if not __import__("os").path.exists(corpus.WORD_LIST):
        pytest.skip(f"{corpus.WORD_LIST} missing: apt-get install wamerican")
    first = corpus.wordfreq_sentences(seed=4, count=300)
    assert first == corpus.wordfreq_sentences(seed=4, count=300) != corpus.wordfreq_sentences(seed=5, count=300)
    assert len(set(first)) == 300 and all(4 <= len(s.split()) <= 12 for s in first)
    with open(corpus.WORD_LIST) as fh:
        dictionary = {w.strip() for w in fh}
    words = {w for s in first for w in s.split()}
    assert words <= dictionary and len(words) > 1000  # many distinct words, every one a dictionary word
    try:
        jobs = corpus.plan(tmp_path, seed=4, n_train=30, n_adapt=5, n_eval_per_slice=2, text="wordfreq")
    except Exception as exc:
        pytest.skip(f"no voices here: {exc}")
    held_eval, held_adapt = corpus.shipped_texts()
    train_text = {j.text for j in jobs if j.split == "train"}
    assert len(train_text) == 30 and not train_text & (held_eval | held_adapt)
    assert not train_text & {j.text for j in jobs if j.split == "eval"}


def test_unknown_engine_and_changed_plan_are_refused(tmp_path):
    from dse.core.errors import DSEError

    with pytest.raises(DSEError, match="unknown engine.*allowed: espeak, flite, festival, pico, mbrola, diphone, rhvoice, accented"):
        corpus.available_voices(("espeak", "sapi"))
    with pytest.raises(DSEError, match="unknown text source 'bible'; allowed: fortunes, wordfreq"):
        corpus.plan(tmp_path, seed=0, n_train=1, n_adapt=1, n_eval_per_slice=1, text="bible")
    if not corpus.available_voices():
        pytest.skip("no text-to-speech engine installed")
    corpus.generate(tmp_path, 3, 2, 0, 0, workers=1, splits=("train",))
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 2
    with pytest.raises(DSEError, match="planned with other settings"):
        corpus.generate(tmp_path, 4, 2, 0, 0, workers=1, splits=("train",))


VOICES = {"espeak": ("espeak-ng", "espeak", "en-us+m3"), "flite": ("flite", "flite", "slt"),
          "festival": ("text2wave", "festival", "kal_diphone"), "pico": ("pico2wave", "pico", "en-GB"),
          "mbrola": ("mbrola", "espeak", "mb-us2"), "festival-mbrola": ("mbrola", "festival", "us1_mbrola"),
          "diphone": ("text2wave", "festival", "rab_diphone"), "rhvoice": ("RHVoice-test", "rhvoice", "bdl"),
          "accented": ("mbrola", "espeak", "mb-de4-en")}


@pytest.mark.parametrize("name", sorted(VOICES))
def test_generation_is_deterministic(tmp_path, name):
    binary, engine, voice = VOICES[name]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (see python -m dse.corpus --help for the Debian packages)")
    if name.endswith("mbrola") and (engine, voice) not in corpus.available_voices(("mbrola",)):
        pytest.skip(f"the MBROLA voice {voice} is not installed (mbrola-us1/-us2 and festvox-us1)")
    if name == "diphone" and (engine, voice) not in corpus.available_voices(("diphone",)):
        pytest.skip(f"the festival voice {voice} is not installed (festvox-rablpc16k)")
    if name == "rhvoice" and (engine, voice) not in corpus.available_voices(("rhvoice",)):
        pytest.skip(f"the RHVoice voice {voice} is not installed (rhvoice-english)")
    if name == "accented" and (engine, voice) not in corpus.available_voices(("accented",)):
        pytest.skip(f"the MBROLA voice {voice} is not installed (mbrola-de4)")
    hashes = []
    for run in range(2):
        job = corpus.Job(id="u", split="eval", slice=engine, text="the quick brown fox", engine=engine, voice=voice,
                         rate=1.1, pitch=0.1, gain=0.5, effect="noise", snr_db=20.0, seed=7,
                         out=str(tmp_path / f"{run}.ogg"))
        row = corpus.render(job)
        assert row["duration"] > 0.3
        hashes.append(corpus.audio_hash(row["path"]))
    assert hashes[0] == hashes[1]


def tiny_batch(n=4, frames=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = models.CharTokenizer()
    feats = [torch.randn(frames + 8 * i, 80, generator=g) for i in range(n)]
    targets = [tok.encode(t) for t in ["ab", "hello", "a cat", "xyz q"][:n]]
    return feats, targets, tok


def test_collate_pads_to_exact_reduced_length():
    feats, targets, tok = tiny_batch()
    x, lengths, tgt, tgt_len = train.collate(feats, targets, stride=4, right_context=4, pad_frame=torch.zeros(80))
    assert x.shape[1] == int(lengths.max()) + 4 and int(lengths.max()) % 4 == 0
    assert all(int(l) % 4 == 0 and int(l) >= f.size(0) for l, f in zip(lengths, feats))
    model = models.build(models.architecture("tiny"), tok.num_symbols)
    logits, logit_lengths, _, _ = model(x, lengths, torch.nn.functional.pad(tgt, (1, 0), value=tok.blank), tgt_len + 1)
    assert int(logit_lengths.max()) == logits.size(1)


def test_few_steps_lower_the_loss():
    torch.manual_seed(0)
    feats, targets, tok = tiny_batch()
    arch = models.architecture("tiny")
    model = models.build(arch, tok.num_symbols)
    head = torch.nn.Linear(arch["encoding_dim"], tok.num_symbols)
    batch = train.collate(feats, targets, 4, 4, torch.zeros(80))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = train.rnnt_step_loss(model, head, batch, tok.blank, 0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_lr_schedule_warms_up_then_decays():
    p = train.Preset(arch="tiny", peak_lr=1e-3, warmup_steps=10, max_steps=100)
    assert train.lr_at(0, p) == pytest.approx(1e-4)
    assert train.lr_at(9, p) == pytest.approx(1e-3)
    assert train.lr_at(99, p) < 0.1 * 1e-3


def test_make_batches_respects_frame_budget():
    lengths = [random.Random(i).randint(50, 400) for i in range(200)]
    batches = train.make_batches(lengths, 2000, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(max(lengths[i] for i in b) * len(b) <= 2000 or len(b) == 1 for b in batches)


def test_train_command_on_two_corpora_resumes(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    for name, voice_seed in (("a", None), ("b", 5)):
        corpus.generate(tmp_path / name, 3, 6, 2, 0, workers=1, splits=("train", "adapt"),
                        engines=("espeak",), voice_seed=voice_seed)
    state = tmp_path / "state"
    common = ["--preset", "tiny", "--corpus", str(tmp_path / "a"), "--corpus", str(tmp_path / "b"),
              "--state-dir", str(state), "--dev-size", "1", "--log-every", "1", "--threads", "1"]
    assert train.main(common + ["--max-steps", "2", "--export", str(tmp_path / "m2.pt")]) == 0
    features = sorted(p.name for p in state.glob("features-*.pt"))
    assert len(features) == 2  # one cache per corpus manifest
    assert torch.load(state / "last.pt", weights_only=False)["step"] == 2
    assert train.main(common + ["--max-steps", "3", "--export", str(tmp_path / "m3.pt")]) == 0
    assert torch.load(state / "last.pt", weights_only=False)["step"] == 3
    loaded = models.load_checkpoint(tmp_path / "m3.pt")
    assert loaded.name == "tiny"
    assert train.main(["--preset", "tiny", "--corpus", str(tmp_path / "none"), "--state-dir", str(state)]) == 2


def test_shipped_eval_sentences_never_reach_training_whatever_the_seed(tmp_path):
    shipped_eval, shipped_adapt = corpus.shipped_texts()
    if not shipped_eval:
        pytest.skip("no shipped eval split")
    try:
        jobs = corpus.plan(tmp_path, seed=11, n_train=3000, n_adapt=600, n_eval_per_slice=10)
    except Exception as exc:
        pytest.skip(f"no corpus sources here: {exc}")
    train_text = {j.text for j in jobs if j.split == "train"}
    adapt_text = {j.text for j in jobs if j.split == "adapt"}
    assert not train_text & shipped_eval and not train_text & shipped_adapt and not adapt_text & shipped_eval


def test_training_dropout_reaches_every_dropout_module_and_not_eval():
    model = models.build(models.architecture("tiny"), models.CharTokenizer().num_symbols)
    assert train.set_dropout(model, 0.5) > 0
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.randn(1, 40 + models.architecture("tiny")["right_context_length"], 80)
    lengths = torch.tensor([40])
    model.train()
    a = model.transcribe(x, lengths)[0]
    b = model.transcribe(x, lengths)[0]
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model.transcribe(x, lengths)[0], model.transcribe(x, lengths)[0])


def test_vtlp_warp_is_identity_at_one_and_moves_a_formant_with_the_factor():
    raw = torch.zeros(3, 80)
    raw[:, 30] = 10.0  # one formant-like peak
    assert torch.allclose(train.warp_frequency(raw, 1.0), raw, atol=1e-5)
    up = train.warp_frequency(raw, 1.15).argmax(-1)
    down = train.warp_frequency(raw, 0.85).argmax(-1)
    assert bool((up > 30).all()) and bool((down < 30).all())
    src = train.vtlp_source_bins(80, 16000, 1.1)
    # Monotone, inside the band, and the band's top stays near the top (Nyquist is kept fixed).
    assert bool((src[1:] > src[:-1]).all()) and float(src[0]) >= 0 and 77.5 < float(src[-1]) <= 79
    # On a normalised batch the warp leaves the shape and the normalisation's frame of reference.
    mean, invstd = torch.randn(80), torch.rand(80) + 0.5
    x = torch.randn(2, 17, 80)
    y = train.vtlp(x.clone(), torch.Generator().manual_seed(0), 0.1, mean, invstd)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert torch.allclose(train.vtlp(x.clone(), torch.Generator().manual_seed(0), 0.0, mean, invstd), x, atol=1e-4)


def test_random_eq_is_smooth_bounded_and_spares_silence():
    gen = torch.Generator().manual_seed(3)
    curves = train.eq_curves(500, 80, gen, 6.0)
    assert curves.shape == (500, 80)
    assert float(curves.abs().max()) <= 6.0 + 1e-4 and float(curves.abs().max()) > 3.0
    # Smooth: neighbouring bins differ by far less than the curve's range.
    assert float((curves[:, 1:] - curves[:, :-1]).abs().max()) < 0.6
    mean, invstd = torch.full((80,), 10.0), torch.full((80,), 0.25)
    raw = torch.full((2, 5, 80), 12.0)
    raw[:, 0] = 0.5  # a digital-silence frame (linear region of the log compression)
    x = (raw - mean) * invstd
    y = train.random_eq(x.clone(), torch.Generator().manual_seed(0), 6.0, mean, invstd)
    gained = y / invstd + mean - raw
    assert torch.allclose(gained[:, 0], torch.zeros(2, 80), atol=1e-5)  # silence untouched
    # Speech frames: one curve per utterance, the same in every frame, within 6 dB of power.
    assert torch.allclose(gained[:, 1:], gained[:, 1:2].expand(-1, 4, -1), atol=1e-5)
    assert float(gained.abs().max()) <= 6.0 * math.log(10) / 10 + 1e-4
    assert not torch.allclose(gained[0, 1], gained[1, 1])
    assert torch.allclose(train.random_eq(x.clone(), torch.Generator().manual_seed(0), 0.0, mean, invstd), x,
                          atol=1e-5)


def test_train_init_starts_from_a_checkpoint_and_refuses_another_architecture(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    corpus.generate(tmp_path / "c", 3, 4, 1, 0, workers=1, splits=("train", "adapt"), engines=("espeak",))
    tok = models.CharTokenizer()
    torch.manual_seed(7)
    start = models.LoadedModel("tiny", models.architecture("tiny"), models.build(models.architecture("tiny"),
                               tok.num_symbols).eval(), tok, models.FeatureConfig(), torch.randn(80),
                               torch.rand(80) + 0.5, "checkpoint")
    models.save_checkpoint(tmp_path / "start.pt", start, half=True)
    common = ["--preset", "tiny", "--corpus", str(tmp_path / "c"), "--dev-size", "1", "--threads", "1"]
    out = tmp_path / "m0.pt"
    assert train.main(common + ["--state-dir", str(tmp_path / "s"), "--init", str(tmp_path / "start.pt"),
                                "--max-steps", "0", "--export", str(out)]) == 0
    first, again = models.load_checkpoint(tmp_path / "start.pt"), models.load_checkpoint(out)
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert torch.equal(again.mean, first.mean) and torch.equal(again.invstd, first.invstd)
    assert train.main(common + ["--state-dir", str(tmp_path / "s"), "--init", str(tmp_path / "start.pt"),
                                "--max-steps", "1", "--vtlp", "0.1", "--eq-db", "6", "--bf16", "--export", str(tmp_path / "m1.pt")]) == 0
    # A folder whose features were normalised otherwise is refused rather than silently mixed.
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / "global_stats.json").write_text('{"mean": [0.0], "invstd": [1.0]}')
    assert train.main(common + ["--state-dir", str(tmp_path / "s3"), "--init", str(tmp_path / "start.pt"),
                                "--max-steps", "0"]) == 2
    if models.default_available():
        assert train.main(common + ["--state-dir", str(tmp_path / "s2"), "--init",
                                    str(models.DEFAULT_CHECKPOINT), "--max-steps", "0"]) == 2


def test_step_loss_equals_the_model_forward_with_one_transcriber_pass():
    torch.manual_seed(0)
    feats, targets, tok = tiny_batch()
    arch = models.architecture("tiny")
    model = models.build(arch, tok.num_symbols).eval()
    head = torch.nn.Linear(arch["encoding_dim"], tok.num_symbols)
    batch = train.collate(feats, targets, 4, 4, torch.zeros(80))
    x, lengths, tgt, tgt_len = batch
    # Reference: RNNT.forward for the RNN-T term, a separate transcribe() for the CTC term.
    logits, logit_lengths, _, _ = model(x, lengths, torch.nn.functional.pad(tgt, (1, 0), value=tok.blank), tgt_len + 1)
    n = tgt_len.sum()
    rnnt = torchaudio.functional.rnnt_loss(logits, tgt, logit_lengths.int(), tgt_len, blank=tok.blank,
                                           reduction="sum") / n
    enc, enc_len = model.transcribe(x, lengths)
    ctc = torch.nn.functional.ctc_loss(head(enc).log_softmax(-1).transpose(0, 1), tgt, enc_len, tgt_len,
                                       blank=tok.blank, reduction="sum", zero_infinity=True) / n
    loss, _ = train.rnnt_step_loss(model, head, batch, tok.blank, 0.3)
    assert float(loss) == pytest.approx(float(0.7 * rnnt + 0.3 * ctc), rel=1e-5)


def test_train_init_grows_a_narrower_ffn_into_the_preset(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    corpus.generate(tmp_path / "c", 3, 4, 1, 0, workers=1, splits=("train", "adapt"), engines=("espeak",))
    tok = models.CharTokenizer()
    narrow = dict(models.architecture("tiny"), transformer_ffn_dim=32)
    torch.manual_seed(3)
    start = models.LoadedModel("tiny", narrow, models.build(narrow, tok.num_symbols).eval(), tok,
                               models.FeatureConfig(), torch.randn(80), torch.rand(80) + 0.5, "checkpoint")
    models.save_checkpoint(tmp_path / "start.pt", start)
    out = tmp_path / "grown.pt"
    assert train.main(["--preset", "tiny", "--corpus", str(tmp_path / "c"), "--dev-size", "1", "--threads", "1",
                       "--state-dir", str(tmp_path / "s"), "--init", str(tmp_path / "start.pt"),
                       "--init", str(tmp_path / "start.pt"),  # the average of a checkpoint with itself: itself
                       "--max-steps", "0", "--export", str(out)]) == 0
    grown = models.load_checkpoint(out)
    assert grown.arch == models.architecture("tiny")
    x, lengths = torch.randn(1, 36, 80), torch.tensor([32])
    with torch.no_grad():
        # fp16 storage of the export: equal to the start's function up to half precision
        assert torch.allclose(start.model.transcribe(x, lengths)[0], grown.model.transcribe(x, lengths)[0],
                              atol=2e-2)
    # A wider FFN than the preset's is not shrunk.
    wide = dict(models.architecture("tiny"), transformer_ffn_dim=256)
    models.save_checkpoint(tmp_path / "wide.pt", dataclasses.replace(start, arch=wide,
                                                                     model=models.build(wide, tok.num_symbols)))
    assert train.main(["--preset", "tiny", "--corpus", str(tmp_path / "c"), "--dev-size", "1", "--threads", "1",
                       "--state-dir", str(tmp_path / "s2"), "--init", str(tmp_path / "wide.pt"),
                       "--max-steps", "0"]) == 2


def test_average_last_exports_the_mean_of_the_last_saves(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    corpus.generate(tmp_path / "c", 3, 4, 1, 0, workers=1, splits=("train", "adapt"), engines=("espeak",))
    state = tmp_path / "s"
    common = ["--preset", "tiny", "--corpus", str(tmp_path / "c"), "--dev-size", "1", "--threads", "1",
              "--state-dir", str(state), "--save-every", "2", "--max-steps", "6"]
    # Three steps without the option (a run stopped before the window), then resumed to the end.
    assert train.main(common + ["--max-steps", "3"]) == 0
    assert not list(state.glob("weights-*.pt"))
    out = tmp_path / "avg.pt"
    assert train.main(common + ["--average-last", "2", "--export", str(out)]) == 0
    kept = sorted(p.name for p in state.glob("weights-*.pt"))
    assert kept == ["weights-000004.pt", "weights-000006.pt"]
    w4, w6 = (torch.load(state / name) for name in kept)
    last = torch.load(state / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(w6[k], last[k]) for k in last)
    assert any(not torch.equal(w4[k], w6[k]) for k in w4)  # two different points of the trajectory
    exported = models.load_checkpoint(out)
    for k, v in exported.model.state_dict().items():
        if v.is_floating_point():
            # fp16 storage: the mean up to half precision
            assert torch.allclose(v, (w4[k] + w6[k]) / 2, atol=1e-3, rtol=1e-3), k
    assert torch.load(out, weights_only=False)["info"]["averaged_steps"] == [4, 6]
    # A state past the window's start without its weights (step 2's) is refused before any step is spent.
    assert train.main(common + ["--average-last", "4", "--max-steps", "8"]) == 2
    assert torch.load(state / "last.pt", weights_only=False)["step"] == 6
    with pytest.raises(SystemExit):
        train.main(common + ["--average-last", "0"])

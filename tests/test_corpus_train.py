import random
import shutil

import pytest
import torch

from dse import corpus, models, train


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


@pytest.mark.parametrize("engine", ["espeak", "flite", "festival"])
def test_generation_is_deterministic(tmp_path, engine):
    binary = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}[engine]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (apt-get install {'espeak-ng' if engine == 'espeak' else engine})")
    voice = {"espeak": "en-us+m3", "flite": "slt", "festival": "kal_diphone"}[engine]
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

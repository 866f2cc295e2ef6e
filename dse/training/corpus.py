"""Synthetic speech corpus: ``python -m dse.corpus --out DIR``.

Text: sentences from the ``fortunes`` and ``fortunes-min`` Debian packages (BSD-style
licensed collections of short everyday English quotations), lower-cased, letters and
apostrophes only, 4-14 words, keeping only sentences whose every word occurs in at
least two sentences (rare names and fragments of jargon would be unlearnable from one
sighting). Sentences are split once, by a seeded shuffle, into disjoint eval, adapt
and train sets: no eval sentence is ever spoken in training, and whatever the seed,
engines or counts, the shipped default's eval and adapt sentences (``dse/default``)
never enter a train split.

``--text wordfreq`` replaces the fortune sentences by word sequences (4-12 words)
drawn from the 30,000 most frequent English words of the ``wordfreq`` package's
frequency lists (Apache-2.0 code, CC-BY-SA 4.0 data; ``pip install wordfreq``), each word with a
probability proportional to the square root of its frequency: a training set that
spells many more words than the fortunes hold, in no sentence a model can memorise.
Only words that are lower-case entries of the system word list (Debian ``wamerican``,
``/usr/share/dict/words``) are kept: no names, acronyms or spellings a voice would
read out letter by letter.

Voices: the offline engines named by ``--engines`` that this machine has. espeak-ng
(8 English accents x many voice variants), flite (kal, kal16, awb, rms, slt) and
festival (kal_diphone, ked_diphone, cmu_us_slt_arctic_hts) are the default set. More
voices come from:

* ``pico``: SVOX Pico, en-US and en-GB (Debian non-free ``libttspico-utils``);
* ``mbrola``: the MBROLA diphone voices us1, us2, us3 and en1, spoken through both
  espeak-ng and festival (Debian contrib/non-free ``mbrola-*`` and ``festvox-*1``);
* ``diphone``: festival's British English diphone voices rab and don (Debian contrib
  ``festvox-rablpc16k`` and ``festvox-don``);
* ``rhvoice``: RHVoice's statistical parametric English voices bdl, clb, slt,
  evgeniy-eng and lyubov (Debian non-free ``rhvoice`` and ``rhvoice-english``).
  RHVoice's ``alan`` is left out: it is built from recordings of the speaker of
  flite's ``awb``, a held-out voice;
* ``accented``: English spoken by espeak-ng through the MBROLA diphone voices of other
  languages (``mb-de1-en`` ... : German de1-de6, French fr1 and fr4, Hungarian hu1,
  Swedish sw1 and sw2, Dutch nl2, Afrikaans af1, Polish pl1, Greek gr2, Romanian ro1),
  sixteen speakers with foreign accents (Debian contrib/non-free ``mbrola-de1`` ...).

Rate, pitch and volume are drawn per utterance; a share of the utterances get additive
noise at 10-30 dB SNR or a synthetic room reverberation. The voices in
:data:`HELD_OUT_VOICES` are never used in train or adapt: they form the eval split's
leave-one-out slice.

Everything is deterministic from ``--seed`` (and the installed voices): the same seed
gives the same text, voice, parameters and noise for every utterance. ``--voice-seed``
keeps the seed's shuffle of sentences but draws new voices and parameters: that is
how to add a second training set with other engines to an existing corpus
(``--splits train --engines pico,mbrola --voice-seed 1 --out OTHER_DIR``; train on
both with ``dse.train --corpus A --corpus B``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dse.core.errors import DSEError, cli_error

FORTUNE_DIRS = ["/usr/share/games/fortunes"]
ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                   "klatt", "klatt2", "klatt3", "adam", "linda", "john", "steph", "robert",
                   "david", "paul", "belinda", "benjamin", "edward", "grandpa", "shelby", "zac"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
FESTIVAL_VOICES = ["kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"]
PICO_VOICES = ["en-US", "en-GB"]
MBROLA_VOICES = ["us1", "us2", "us3", "en1"]
DIPHONE_VOICES = ["rab_diphone", "don_diphone"]
RHVOICE_VOICES = ["bdl", "clb", "slt", "evgeniy-eng", "lyubov"]  # not alan: the held-out awb speaker
# MBROLA diphone sets of other languages that espeak-ng drives with English phonemes (voice mb-<set>-en).
ACCENTED_VOICES = ["de1", "de2", "de3", "de4", "de5", "de6", "fr1", "fr4", "hu1", "sw1", "sw2", "nl2", "af1",
                   "pl1", "gr2", "ro1"]
ENGINES = ("espeak", "flite", "festival", "pico", "mbrola", "diphone", "rhvoice", "accented")
DEFAULT_ENGINES = ("espeak", "flite", "festival")
# Never spoken in train or adapt: the eval split's leave-one-out slice.
HELD_OUT_VOICES = {("flite", "awb"), ("festival", "ked_diphone")}
SAMPLE_RATE_HZ = 16000


@dataclasses.dataclass(frozen=True)
class Job:
    """One utterance to synthesise. ``rate`` is a speed factor (1 = engine default)."""
    id: str
    split: str
    slice: str
    text: str
    engine: str
    voice: str
    rate: float
    pitch: float
    gain: float
    effect: str  # "clean" | "noise" | "reverb"
    snr_db: float
    seed: int
    out: str


def normalise_text(sentence: str) -> str:
    s = sentence.lower().replace("-", " ")
    s = re.sub(r"[^a-z' ]", " ", s)
    words = [w.strip("'") for w in s.split()]
    return " ".join(w for w in words if w)


def load_sentences(dirs=FORTUNE_DIRS, min_words=4, max_words=14, min_word_count=2) -> list[str]:
    """Every usable sentence from the fortune files, sorted (so the order is reproducible)."""
    files = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*"))
                   if os.path.isfile(f) and "." not in os.path.basename(f))
    if not files:
        raise DSEError(f"no fortune files under {dirs}: install the Debian packages 'fortunes' and 'fortunes-min'")
    sentences = set()
    for f in files:
        with open(f, encoding="utf-8", errors="ignore") as fh:
            for cookie in fh.read().split("\n%\n"):
                cookie = re.sub(r"\s+", " ", cookie)
                for raw in re.split(r"(?<=[.!?])\s+", cookie):
                    if re.search(r"[0-9@#$%^&*_=+<>/\\|{}\[\]~`]", raw):
                        continue
                    s = normalise_text(raw)
                    if any(len(w) == 1 and w not in ("a", "i") for w in s.split()):
                        continue  # initials and list markers ("h c blow the horn")
                    if min_words <= len(s.split()) <= max_words:
                        sentences.add(s)
    counts = collections.Counter(w for s in sentences for w in s.split())
    return sorted(s for s in sentences if all(counts[w] >= min_word_count for w in s.split()))


TEXT_SOURCES = ("fortunes", "wordfreq")
WORD_LIST = "/usr/share/dict/words"


def wordfreq_sentences(seed: int, count: int, top_n: int = 30000, min_words: int = 4,
                       max_words: int = 12) -> list[str]:
    """``count`` distinct word sequences drawn from ``wordfreq``'s English list, sorted."""
    try:
        import wordfreq
    except ImportError:
        raise DSEError("--text wordfreq needs the wordfreq package: pip install wordfreq") from None
    if not os.path.exists(WORD_LIST):
        raise DSEError(f"--text wordfreq keeps only dictionary words and {WORD_LIST} is missing: "
                       "apt-get install wamerican")
    with open(WORD_LIST, encoding="utf-8", errors="ignore") as fh:
        dictionary = {line.strip() for line in fh if re.fullmatch(r"[a-z']+", line.strip())}
    words, seen = [], set()
    for raw in wordfreq.top_n_list("en", top_n):
        w = normalise_text(raw)
        if w in dictionary and w not in seen and (len(w) > 1 or w in ("a", "i")):
            seen.add(w)
            words.append(w)
    weights = [wordfreq.word_frequency(w, "en") ** 0.5 for w in words]
    rng = random.Random(seed)
    sentences: set[str] = set()
    while len(sentences) < count:
        sentences.add(" ".join(rng.choices(words, weights, k=rng.randint(min_words, max_words))))
    return sorted(sentences)


def _mbrola_voice_installed(voice: str) -> bool:
    return bool(shutil.which("mbrola")) and bool(glob.glob(f"/usr/share/mbrola/{voice}/{voice}*"))


def available_voices(engines=DEFAULT_ENGINES) -> list[tuple[str, str]]:
    """``(engine, voice)`` pairs of the selected engines that this machine can run.

    An MBROLA voice is spoken by the engine that drives it (``espeak`` voice
    ``mb-us1``, ``festival`` voice ``us1_mbrola``).
    """
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise DSEError(f"unknown engine(s) {', '.join(unknown)}; allowed: {', '.join(ENGINES)}")
    voices = []
    festival_root = "/usr/share/festival/voices"
    if "espeak" in engines and shutil.which("espeak-ng"):
        voices += [("espeak", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    if "flite" in engines and shutil.which("flite"):
        voices += [("flite", v) for v in FLITE_VOICES]
    if "festival" in engines and shutil.which("text2wave"):
        voices += [("festival", v) for v in FESTIVAL_VOICES if glob.glob(f"{festival_root}/*/{v}")]
    if "pico" in engines and shutil.which("pico2wave"):
        voices += [("pico", v) for v in PICO_VOICES]
    if "mbrola" in engines:
        for v in MBROLA_VOICES:
            if not _mbrola_voice_installed(v):
                continue
            if shutil.which("espeak-ng"):
                voices.append(("espeak", f"mb-{v}"))
            if shutil.which("text2wave") and glob.glob(f"{festival_root}/*/{v}_mbrola"):
                voices.append(("festival", f"{v}_mbrola"))
    if "diphone" in engines and shutil.which("text2wave"):
        voices += [("festival", v) for v in DIPHONE_VOICES if glob.glob(f"{festival_root}/*/{v}")]
    if "rhvoice" in engines and shutil.which("RHVoice-test"):
        voices += [("rhvoice", v) for v in RHVOICE_VOICES if os.path.isdir(f"/usr/share/RHVoice/voices/{v}")]
    if "accented" in engines and shutil.which("espeak-ng"):
        voices += [("espeak", f"mb-{v}-en") for v in ACCENTED_VOICES if _mbrola_voice_installed(v)]
    return voices


def shipped_texts() -> tuple[set[str], set[str]]:
    """Sentences of the shipped default's eval and adapt splits (empty sets when absent)."""
    from dse.core.models import DEFAULT_ADAPT, DEFAULT_EVAL

    def texts(manifest: Path) -> set[str]:
        if not manifest.exists():
            return set()
        return {json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()}

    return texts(DEFAULT_EVAL), texts(DEFAULT_ADAPT)


def plan(out: Path, seed: int, n_train: int, n_adapt: int, n_eval_per_slice: int,
         engines=DEFAULT_ENGINES, voice_seed: int | None = None, text: str = "fortunes") -> list[Job]:
    """Decide every utterance (text, voice, parameters) from the seeds and the installed voices."""
    if text not in TEXT_SOURCES:
        raise DSEError(f"unknown text source {text!r}; allowed: {', '.join(TEXT_SOURCES)}")
    rng = random.Random(seed)
    if text == "fortunes":
        sentences = load_sentences()
    else:
        # The eval slices are at most espeak, flite, festival, pico, rhvoice and heldout: fixed, so
        # that a seed's word sequences stay the same when an engine group is added.
        n_slices = 6
        sentences = wordfreq_sentences(seed, n_train + n_adapt + n_eval_per_slice * n_slices + 100)
    rng.shuffle(sentences)
    if voice_seed is not None:
        rng = random.Random(voice_seed)
    voices = available_voices(engines)
    if not voices:
        raise DSEError(f"no text-to-speech voice found for engines {', '.join(engines)}: install espeak-ng, "
                       "flite or festival (pico: libttspico-utils; mbrola: mbrola and mbrola-us1 ...; "
                       "diphone: festvox-rablpc16k, festvox-don; rhvoice: rhvoice, rhvoice-english; "
                       "accented: mbrola, mbrola-de1 ...)")
    held = [v for v in voices if v in HELD_OUT_VOICES]
    seen = [v for v in voices if v not in HELD_OUT_VOICES]
    engines = sorted({e for e, _ in seen})
    eval_slices = [(e, [v for v in seen if v[0] == e]) for e in engines]
    if held:
        eval_slices.append(("heldout", held))
    n_eval = n_eval_per_slice * len(eval_slices)
    if len(sentences) < n_eval + n_adapt + 100:
        raise DSEError(f"only {len(sentences)} sentences available, need more than {n_eval + n_adapt + 100}")
    eval_text, rest = sentences[:n_eval], sentences[n_eval:]
    adapt_text, train_text = rest[:n_adapt], rest[n_adapt:]
    # Whatever the seed, engines or counts: the shipped default's eval sentences are never
    # spoken in adapt or train, nor its adapt sentences in train.
    shipped_eval, shipped_adapt = shipped_texts()
    adapt_text = [t for t in adapt_text if t not in shipped_eval]
    train_text = [t for t in train_text if t not in shipped_eval and t not in shipped_adapt]

    def by_engine(pool):
        # Balance engines (espeak has far more voice variants than the others).
        groups = collections.defaultdict(list)
        for v in pool:
            groups[v[0]].append(v)
        return [groups[e] for e in sorted(groups)]

    jobs: list[Job] = []

    def add(split, slice_name, text, pool_groups, index):
        group = pool_groups[rng.randrange(len(pool_groups))]
        engine, voice = group[rng.randrange(len(group))]
        effect = rng.choices(["clean", "noise", "reverb"], weights=[0.6, 0.25, 0.15])[0] if split != "eval" else \
            rng.choices(["clean", "noise"], weights=[0.8, 0.2])[0]
        uid = f"{split}-{index:06d}"
        jobs.append(Job(
            id=uid, split=split, slice=slice_name, text=text, engine=engine, voice=voice,
            rate=rng.uniform(0.8, 1.25), pitch=rng.uniform(-0.3, 0.3), gain=rng.uniform(0.3, 0.9),
            effect=effect, snr_db=rng.uniform(10, 30), seed=rng.randrange(2**31),
            out=str(out / split / f"{uid}.{'ogg' if split != 'train' else 'flac'}")))

    for i, text in enumerate(eval_text):
        name, pool = eval_slices[i % len(eval_slices)]
        add("eval", name, text, [pool], i)
    seen_groups = by_engine(seen)
    for i, text in enumerate(adapt_text):
        add("adapt", "adapt", text, seen_groups, i)
    i = 0
    while i < n_train:
        for text in train_text:
            if i >= n_train:
                break
            add("train", "train", text, seen_groups, i)
            i += 1
    return jobs


def _run(cmd: list[str], text: str | None = None) -> None:
    result = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise DSEError(f"{cmd[0]} failed ({result.returncode}): {result.stderr.strip()[:300]}")


def synthesise(job: Job, wav_path: str) -> None:
    """Run the job's engine, writing a WAV file at the engine's own sample rate."""
    if job.engine == "espeak":
        speed_wpm = int(175 * job.rate)
        pitch = int(50 + 40 * job.pitch)
        _run(["espeak-ng", "-v", job.voice, "-s", str(speed_wpm), "-p", str(pitch), "-w", wav_path, job.text])
    elif job.engine == "flite":
        _run(["flite", "-voice", job.voice, "--setf", f"duration_stretch={1 / job.rate:.3f}",
              "--setf", f"int_f0_target_mean={int(110 * (1 + job.pitch))}" if job.voice in ("kal", "kal16", "awb", "rms")
              else f"int_f0_target_mean={int(170 * (1 + job.pitch))}",
              "-t", job.text, "-o", wav_path])
    elif job.engine == "pico":
        # SVOX Pico takes rate and pitch as markup; levels are percentages of its default.
        markup = (f'<speed level="{int(100 * job.rate)}"><pitch level="{int(100 * (1 + job.pitch))}">'
                  f"{job.text}</pitch></speed>")
        _run(["pico2wave", "-l", job.voice, "-w", wav_path, markup])
    elif job.engine == "rhvoice":
        # Rate and pitch in percent of the voice's default; text on stdin.
        _run(["RHVoice-test", "-p", job.voice, "-r", str(int(100 * job.rate)), "-t", str(int(100 * (1 + job.pitch))),
              "-o", wav_path], text=job.text)
    elif job.engine == "festival":
        scheme = f"(voice_{job.voice})(Parameter.set 'Duration_Stretch {1 / job.rate:.3f})"
        _run(["text2wave", "-eval", scheme, "-o", wav_path], text=job.text)
    else:
        raise DSEError(f"unknown engine {job.engine!r}")


def _room_impulse(rng: np.random.Generator, rate: int) -> np.ndarray:
    rt60_s = rng.uniform(0.15, 0.6)
    n = int(rt60_s * rate)
    t = np.arange(n) / rate
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s)
    ir[0] = 1.0
    return ir / np.sqrt((ir ** 2).sum())


def render(job: Job) -> dict:
    """Synthesise, resample to 16 kHz, apply the job's effect and gain, write the file."""
    import torch
    import torchaudio
    import soundfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "a.wav")
        synthesise(job, wav)
        data, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    x = data.mean(axis=1)
    if rate != SAMPLE_RATE_HZ:
        x = torchaudio.functional.resample(torch.from_numpy(x), rate, SAMPLE_RATE_HZ).numpy()
    # Trim leading/trailing digital silence beyond 0.15 s, as engines pad very differently.
    nz = np.flatnonzero(np.abs(x) > 1e-3)
    if nz.size == 0:
        raise DSEError(f"{job.id}: {job.engine}/{job.voice} produced silence for {job.text!r}")
    pad = int(0.15 * SAMPLE_RATE_HZ)
    x = x[max(0, nz[0] - pad): nz[-1] + pad]
    rng = np.random.default_rng(job.seed)
    if job.effect == "reverb":
        x = np.convolve(x, _room_impulse(rng, SAMPLE_RATE_HZ))[: len(x)]
    x = x / (np.abs(x).max() + 1e-9) * job.gain
    if job.effect == "noise":
        power = np.mean(x ** 2)
        noise = rng.standard_normal(len(x))
        if rng.random() < 0.5:  # brown-ish noise as well as white
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
        noise *= np.sqrt(power / (np.mean(noise ** 2) + 1e-12) / 10 ** (job.snr_db / 10))
        x = x + noise
    x = np.clip(x, -1, 1).astype(np.float32)
    Path(job.out).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(job.out, x, SAMPLE_RATE_HZ)
    return {"id": job.id, "path": job.out, "duration": round(len(x) / SAMPLE_RATE_HZ, 3), "text": job.text,
            "slice": job.slice, "engine": job.engine, "voice": job.voice, "effect": job.effect}


def _render_safe(job: Job):
    try:
        return render(job), None
    except Exception as exc:  # reported and skipped, never fatal to the corpus
        return None, f"{job.id} ({job.engine}/{job.voice}): {exc}"


def generate(out: Path, seed: int, n_train: int, n_adapt: int, n_eval_per_slice: int,
             workers: int, splits: tuple[str, ...] = ("train", "adapt", "eval"),
             engines=DEFAULT_ENGINES, voice_seed: int | None = None, text: str = "fortunes") -> dict[str, Path]:
    from tqdm import tqdm

    jobs = [j for j in plan(out, seed, n_train, n_adapt, n_eval_per_slice, engines, voice_seed, text)
            if j.split in splits]
    # A finished file is reused on a rerun (resumable), so the folder must hold this very plan.
    digest = hashlib.sha256(json.dumps([dataclasses.astuple(dataclasses.replace(j, out=os.path.relpath(j.out, out)))
                                      for j in jobs]).encode()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / f"plan-{'-'.join(splits)}.sha256"
    if stamp.exists() and stamp.read_text().strip() != digest:
        raise DSEError(f"{out} holds a corpus planned with other settings (seed, counts, engines or installed "
                       f"voices differ); use another --out or delete {stamp} and the audio")
    stamp.write_text(digest + "\n")
    rows: dict[str, list] = collections.defaultdict(list)
    failures = []
    todo = []
    for job in jobs:
        if Path(job.out).exists():  # resumable: a finished file is not made again
            import soundfile
            info = soundfile.info(job.out)
            rows[job.split].append({"id": job.id, "path": job.out, "duration": round(info.frames / info.samplerate, 3),
                                    "text": job.text, "slice": job.slice, "engine": job.engine,
                                    "voice": job.voice, "effect": job.effect})
        else:
            todo.append(job)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for row, problem in tqdm(pool.map(_render_safe, todo, chunksize=8), total=len(todo),
                                 desc="synthesising", unit="utt"):
            if problem:
                failures.append(problem)
            else:
                rows[row["id"].split("-")[0]].append(row)
    manifests = {}
    for split, items in rows.items():
        items.sort(key=lambda r: r["id"])
        path = out / f"{split}.jsonl"
        with open(path, "w") as f:
            for r in items:
                r = dict(r, path=os.path.relpath(r["path"], out))
                f.write(json.dumps(r) + "\n")
        manifests[split] = path
    for problem in failures:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"{sum(len(v) for v in rows.values())} utterances written, {len(failures)} skipped", file=sys.stderr)
    return manifests


def audio_hash(path: str | os.PathLike) -> str:
    import soundfile
    data, _ = soundfile.read(str(path), dtype="int16")
    return hashlib.sha256(data.tobytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dse.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (train/, adapt/, eval/ and one manifest per split)")
    p.add_argument("--seed", type=int, default=0, help="seed for text split, voices, parameters and noise (default 0)")
    p.add_argument("--train", type=int, default=20000, help="number of training utterances (default 20000)")
    p.add_argument("--adapt", type=int, default=600, help="number of adaptation utterances (default 600)")
    p.add_argument("--eval-per-slice", type=int, default=60, help="eval utterances per slice (per engine + held-out; default 60)")
    p.add_argument("--splits", default="train,adapt,eval", help="comma-separated splits to generate (default all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel synthesis processes")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated engines to use, of {', '.join(ENGINES)} (default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--voice-seed", type=int,
                   help="draw voices and parameters from this seed, keeping --seed's split of sentences")
    p.add_argument("--text", choices=TEXT_SOURCES, default="fortunes",
                   help="sentences: fortune-file sentences (default) or wordfreq word sequences")
    args = p.parse_args(argv)
    try:
        generate(args.out, args.seed, args.train, args.adapt, args.eval_per_slice, args.workers,
                 tuple(args.splits.split(",")), tuple(e for e in args.engines.split(",") if e), args.voice_seed,
                 args.text)
    except DSEError as exc:
        return cli_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

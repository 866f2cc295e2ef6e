"""Named Emformer RNN-T architectures, tokenizers and the three ways to get weights.

* ``base``: exactly torchaudio's ``emformer_rnnt_base(num_symbols=4097)`` (76,738,049
  parameters, 292.7 MiB fp32), the architecture of ``EMFORMER_RNNT_BASE_LIBRISPEECH``.
* ``small``: the embedded default, the same builder with 6 narrower layers and a
  character vocabulary; trained by :mod:`dse.training.train`.
* ``tiny``: a two-layer model for tests.

Weights come from a project checkpoint (:func:`load_checkpoint`), a local directory
holding torchaudio's pretrained assets (:func:`load_torchaudio_bundle`), or random
initialisation (:func:`random_model`), in which case accuracy is "not measured".
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torchaudio.models import RNNT, emformer_rnnt_model

from dse.core.errors import ModelLoadError, not_empty
from dse.core.files import file_sha256
from dse.core.features import FeatureConfig, LogMel
from dse.core import vocab
from dse.core.vocab import CharTokenizer, NumberedTokenizer

CHECKPOINT_FORMAT = "dse-checkpoint"
CHECKPOINT_VERSION = 1

_BASE = dict(
    input_dim=80, encoding_dim=1024, segment_length=16, right_context_length=4,
    time_reduction_input_dim=128, time_reduction_stride=4, transformer_num_heads=8,
    transformer_ffn_dim=2048, transformer_num_layers=20, transformer_dropout=0.1,
    transformer_activation="gelu", transformer_left_context_length=30, transformer_max_memory_size=0,
    transformer_weight_init_scale_strategy="depthwise", transformer_tanh_on_mem=True,
    symbol_embedding_dim=512, num_lstm_layers=3, lstm_layer_norm=True, lstm_layer_norm_epsilon=1e-3,
    lstm_dropout=0.3)

ARCHITECTURES: dict[str, dict] = {
    "base": dict(_BASE),
    "small": dict(_BASE, encoding_dim=256, time_reduction_input_dim=48, transformer_num_heads=4,
                  transformer_ffn_dim=768, transformer_num_layers=6, transformer_dropout=0.0,
                  symbol_embedding_dim=256, num_lstm_layers=1, lstm_dropout=0.0),
    "tiny": dict(_BASE, encoding_dim=64, time_reduction_input_dim=16, transformer_num_heads=2,
                 transformer_ffn_dim=128, transformer_num_layers=2, transformer_dropout=0.0,
                 transformer_left_context_length=8, symbol_embedding_dim=64, num_lstm_layers=1,
                 lstm_dropout=0.0),
}
# ``small`` with an FFN of 2,048 instead of 768 in every Emformer layer: grown from a trained
# ``small`` checkpoint by :func:`widen_ffn` (``python -m dse.train --preset small-wide --init``).
ARCHITECTURES["small-wide"] = dict(ARCHITECTURES["small"], transformer_ffn_dim=2048)
BASE_NUM_SYMBOLS = 4097

TORCHAUDIO_BUNDLE_FILES = ("emformer_rnnt_base_librispeech.pt", "global_stats_rnnt_librispeech.json",
                           "spm_bpe_4096_librispeech.model")


class SentencePieceTokenizer:
    """torchaudio's LibriSpeech sentencepiece model; blank = vocabulary size (4096)."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece

        self.model_path = str(model_path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self.blank = self.sp.get_piece_size()

    @property
    def num_symbols(self) -> int:
        return self.blank + 1

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text.upper())

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.blank]).lower()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model_path": self.model_path}


@dataclasses.dataclass
class LoadedModel:
    """A model with everything needed to stream it.

    ``weights`` says where the weights came from: ``"checkpoint:<path>"``,
    ``"torchaudio:<dir>"`` or ``"random"`` (accuracy is then not measurable).
    ``lm_path``: a character language model (:mod:`dse.core.lm`) for shallow fusion, or
    ``None``; a checkpoint ``X.pt`` brings ``X.lm.gz`` when that file sits beside it.
    """
    name: str
    arch: dict
    model: RNNT
    tokenizer: object
    features: FeatureConfig
    mean: torch.Tensor
    invstd: torch.Tensor
    weights: str
    info: dict = dataclasses.field(default_factory=dict)
    lm_path: Optional[str] = None

    @property
    def trained(self) -> bool:
        return self.weights != "random"

    def logmel(self) -> LogMel:
        return LogMel(self.features, self.mean, self.invstd)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(arch: dict, num_symbols: int) -> RNNT:
    """Build an Emformer RNN-T from architecture keyword arguments."""
    return emformer_rnnt_model(**arch, num_symbols=num_symbols)


def architecture(name: str) -> dict:
    try:
        return dict(ARCHITECTURES[name])
    except KeyError:
        raise ModelLoadError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def average_weights(models_: Sequence[LoadedModel]) -> LoadedModel:
    """The element-wise mean of several checkpoints' weights (a "model soup").

    All must share architecture, vocabulary, features and normalisation statistics: the
    average of models trained on differently normalised features means nothing.
    """
    first = models_[0]
    for other in models_[1:]:
        if (other.arch != first.arch or other.tokenizer.to_dict() != first.tokenizer.to_dict()
                or other.features != first.features or not torch.equal(other.mean, first.mean)
                or not torch.equal(other.invstd, first.invstd)):
            raise ModelLoadError(f"cannot average {first.weights} and {other.weights}: they differ in architecture, "
                                 "vocabulary, features or feature statistics")
    states = [m.model.state_dict() for m in models_]
    model = build(first.arch, first.tokenizer.num_symbols)
    model.load_state_dict({k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v)
                           for k, v in states[0].items()})
    return dataclasses.replace(first, model=model.eval(), weights="average:" + ",".join(m.weights for m in models_))


def widen_ffn(loaded: LoadedModel, ffn_dim: int, seed: int = 0) -> LoadedModel:
    """``loaded`` with every Emformer layer's FFN grown to ``ffn_dim`` hidden units, same function.

    The new hidden units get the fresh initialisation of a newly built model for their input
    weights and zero output weights, so the grown model computes exactly what ``loaded``
    computes until training moves those zeros; the old units keep their weights.
    """
    old = loaded.arch["transformer_ffn_dim"]
    if ffn_dim < old:
        raise ModelLoadError(f"cannot widen an FFN of {old} hidden units to {ffn_dim}")
    arch = dict(loaded.arch, transformer_ffn_dim=ffn_dim)
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random stream untouched
        torch.manual_seed(seed)
        model = build(arch, loaded.tokenizer.num_symbols)
    state = model.state_dict()
    for key, value in loaded.model.state_dict().items():
        new = state[key]
        if new.shape == value.shape:
            new.copy_(value)
        elif key.endswith("pos_ff.1.weight") or key.endswith("pos_ff.1.bias"):
            new[:old] = value  # input side: old units first, fresh ones after
        elif key.endswith("pos_ff.4.weight"):
            new[:, :old] = value
            new[:, old:] = 0.0  # output side: the fresh units contribute nothing yet
        else:
            raise ModelLoadError(f"widen_ffn: unexpected shape change at {key}: "
                                 f"{tuple(value.shape)} -> {tuple(new.shape)}")
    model.load_state_dict(state)
    return dataclasses.replace(loaded, arch=arch, model=model.eval())


def random_model(name: str = "base", seed: int = 0, tokenizer=None) -> LoadedModel:
    """Randomly initialised model, for latency work only."""
    arch = architecture(name)
    if tokenizer is None:
        tokenizer = NumberedTokenizer(BASE_NUM_SYMBOLS) if name == "base" else CharTokenizer()
    torch.manual_seed(seed)
    model = build(arch, tokenizer.num_symbols).eval()
    n_mels = arch["input_dim"]
    return LoadedModel(name, arch, model, tokenizer, FeatureConfig(n_mels=n_mels), torch.zeros(n_mels),
                       torch.ones(n_mels), "random")


def save_checkpoint(path: str | os.PathLike, loaded: LoadedModel, half: bool = False, extra: Optional[dict] = None) -> None:
    """Write a project checkpoint; ``half`` stores float weights as fp16 (half the bytes)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in loaded.model.state_dict().items()}
    blob = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "name": loaded.name, "arch": loaded.arch,
        "tokenizer": loaded.tokenizer.to_dict(), "features": loaded.features.to_dict(),
        "mean": loaded.mean.tolist(), "invstd": loaded.invstd.tolist(), "state_dict": state,
        "info": dict(loaded.info, **(extra or {})),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a checkpoint file (a torchaudio asset directory goes "
                             "to --weights)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(f"{path}: not a dse checkpoint (no format={CHECKPOINT_FORMAT!r} field)")
    if blob["version"] > CHECKPOINT_VERSION:
        raise ModelLoadError(f"{path}: checkpoint version {blob['version']} is newer than this dse "
                             f"(reads up to {CHECKPOINT_VERSION}); upgrade dse")
    tokenizer = tokenizer_from_dict(blob["tokenizer"], where=str(path))
    model = build(blob["arch"], tokenizer.num_symbols)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    model.load_state_dict(state)
    info = dict(blob.get("info", {}), checkpoint_sha256=file_sha256(path))
    lm = lm_beside(path)
    return LoadedModel(blob["name"], blob["arch"], model.eval(), tokenizer, FeatureConfig(**blob["features"]),
                       torch.tensor(blob["mean"]), torch.tensor(blob["invstd"]), f"checkpoint:{path.resolve()}", info,
                       str(lm) if lm.exists() else None)


def lm_beside(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's own language model lives: ``X.pt`` -> ``X.lm.gz``."""
    return Path(checkpoint).with_suffix(".lm.gz")


def with_lm(loaded: LoadedModel, lm_path: Optional[str]) -> LoadedModel:
    """``loaded`` with the language model at ``lm_path`` (``None``: unchanged)."""
    if lm_path is None:
        return loaded
    not_empty(lm_path, "--lm", "a language model file (.lm.gz)", ModelLoadError)
    if Path(lm_path).is_dir():
        raise ModelLoadError(f"language model {lm_path} is a directory; give the .lm.gz file")
    if not Path(lm_path).is_file():
        raise ModelLoadError(f"language model {lm_path} not found (build one with python -m dse.lm build)")
    return dataclasses.replace(loaded, lm_path=str(lm_path))


def tokenizer_from_dict(data: dict, where: str = "tokenizer"):
    """Rebuild a tokenizer from its ``to_dict()`` form."""
    kind = data.get("kind")
    simple = vocab.from_dict(data)
    if simple is not None:
        return simple
    if kind == "sentencepiece":
        return SentencePieceTokenizer(data["model_path"])
    raise ModelLoadError(f"{where}: unsupported tokenizer kind {kind!r} (known: chars, numbered, sentencepiece)")


def load_torchaudio_bundle(directory: str | os.PathLike) -> LoadedModel:
    """Load the ``EMFORMER_RNNT_BASE_LIBRISPEECH`` assets from a local directory.

    The directory must hold the three files torchaudio's pipeline downloads:
    ``emformer_rnnt_base_librispeech.pt`` (state dict), ``global_stats_rnnt_librispeech.json``
    (``{"mean": [80], "invstddev": [80]}``) and ``spm_bpe_4096_librispeech.model``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: not a directory (expected torchaudio's Emformer RNN-T assets)")
    missing = [f for f in TORCHAUDIO_BUNDLE_FILES if not (directory / f).exists()]
    if missing:
        raise ModelLoadError(f"{directory}: incomplete torchaudio bundle, missing {', '.join(missing)} "
                             f"(needs {', '.join(TORCHAUDIO_BUNDLE_FILES)})")
    arch = architecture("base")
    model = build(arch, BASE_NUM_SYMBOLS)
    try:
        state = torch.load(directory / TORCHAUDIO_BUNDLE_FILES[0], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        with open(directory / TORCHAUDIO_BUNDLE_FILES[1]) as f:
            stats = json.load(f)
        mean, invstd = torch.tensor(stats["mean"]), torch.tensor(stats["invstddev"])
        tokenizer = SentencePieceTokenizer(directory / TORCHAUDIO_BUNDLE_FILES[2])
    except Exception as exc:
        raise ModelLoadError(f"{directory}: could not load torchaudio bundle ({exc})") from exc
    return LoadedModel("base", arch, model.eval(), tokenizer, FeatureConfig(), mean, invstd, f"torchaudio:{directory}")


DEFAULT_DIR = Path(__file__).resolve().parent.parent / "default"
DEFAULT_CHECKPOINT = DEFAULT_DIR / "model.pt"
DEFAULT_EVAL = DEFAULT_DIR / "eval" / "manifest.jsonl"
DEFAULT_ADAPT = DEFAULT_DIR / "adapt" / "manifest.jsonl"


def default_available() -> bool:
    return DEFAULT_CHECKPOINT.exists()


def load_model(model: Optional[str] = None, weights: Optional[str] = None, seed: int = 0) -> LoadedModel:
    """Resolve the CLI's ``--model``/``--weights`` pair.

    * ``model`` is an architecture name or a checkpoint path; ``None`` means the shipped
      default (or ``base`` with random weights while no default is shipped).
    * ``weights`` is ``"random"``, a checkpoint path, or a torchaudio asset directory.
    """
    if model is None and weights is None:
        return load_checkpoint(DEFAULT_CHECKPOINT) if default_available() else random_model("base", seed)
    not_empty(model, "--model", "an architecture name (base, small, tiny) or a checkpoint", ModelLoadError)
    if model is not None and model not in ARCHITECTURES:
        if weights not in (None,):
            raise ModelLoadError(f"--model {model!r} is a path; do not pass --weights with it")
        return load_checkpoint(model)
    if weights is None or weights == "random":
        return random_model(model or "base", seed)
    not_empty(weights, "--weights", "'random', a checkpoint or a torchaudio asset directory", ModelLoadError)
    wpath = Path(weights)
    if wpath.is_dir():
        if model not in (None, "base"):
            raise ModelLoadError(f"a torchaudio asset directory holds the 'base' architecture, not {model!r}")
        return load_torchaudio_bundle(wpath)
    loaded = load_checkpoint(wpath)
    if model is not None and loaded.arch != architecture(model):
        raise ModelLoadError(f"{wpath}: checkpoint architecture {loaded.name!r} does not match --model {model!r}")
    return loaded

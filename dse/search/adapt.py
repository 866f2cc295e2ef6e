"""Budgeted adaptation of an edited model: fine-tune on the adapt split, distil from the dense model.

Loss per batch: RNN-T loss on the transcripts, plus ``distill_weight`` times the KL
divergence from the unedited (teacher) model's joint distribution when both models see
the same frames (same hop), plus ``balance_weight`` times the MoE load-balancing loss.
Every ``check_every`` steps the student is streamed greedily over a dev subset of the
adapt split (never the eval split) and ``on_progress(step, dev_wer)`` is called; it
may raise to abandon the adaptation (the study records the trial as pruned).

Adapted weights are cached by content: the key hashes the teacher's identity and the
configuration's weight-determining knobs (:func:`dse.core.knobs.weight_knobs`), so a
configuration is never adapted twice, whichever worker asks. Progress is cached too,
whether the adaptation finished or was stopped: at every check the student's weights
are kept (``progress/<edit key>/step-N.pt``, the edit key leaving ``adapt_steps`` out),
with one resumable state (optimiser, batches, random state) of the furthest step. The
learning rate does not depend on the step budget, so a later request for the same edit
continues from the furthest step instead of starting again, and a request for a step
already checked is served from its snapshot (its dev checks replayed to ``on_progress``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dse.core.config import TrialConfig
from dse.core.datasets import read_manifest
from dse.core.errors import DSEError
from dse.core.features import FeatureConfig, LogMel
from dse.core.models import LoadedModel
from dse.core.moe import moe_blocks
from dse.core.rnnt import collate, make_batches, rnnt_step_loss, silence_frame, streaming_wer

DEFAULT_CACHE = Path(os.environ.get("DSE_CACHE", Path.home() / ".cache" / "dse")) / "adapted"


@dataclasses.dataclass
class AdaptSettings:
    lr: float = 3e-4
    warmup_steps: int = 10
    batch_frames: int = 4000
    distill_weight: float = 0.5
    balance_weight: float = 0.01
    dev_size: int = 30
    check_every: int = 30
    grad_clip: float = 5.0
    seed: int = 0


class Adapter:
    """Callable ``(edited, config, on_progress=None) -> (state_dict, info)`` used by the transforms."""

    def __init__(self, teacher: LoadedModel, manifest: str | os.PathLike, cache_dir: Optional[str] = None,
                 device: str = "cpu", settings: AdaptSettings = AdaptSettings()):
        self.teacher = teacher
        self.manifest = Path(manifest)
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.device = torch.device(device)
        self.settings = settings
        self._audio = None
        self._features: dict = {}

    # -- data ---------------------------------------------------------------------------
    def _load_audio(self):
        if self._audio is None:
            from dse.core.audio import read_audio

            utts = read_manifest(self.manifest)
            dev, train = utts[: self.settings.dev_size], utts[self.settings.dev_size:]
            self._audio = (dev, [(read_audio(u.path), u.text) for u in train])
        return self._audio

    def _features_for(self, fcfg: FeatureConfig):
        key = (fcfg.window_samples, fcfg.hop_samples)
        if key not in self._features:
            dev, train = self._load_audio()
            if key == (self.teacher.features.window_samples, self.teacher.features.hop_samples):
                mean, invstd = self.teacher.mean, self.teacher.invstd
            else:  # a new front end: normalisation statistics of its own, from the adapt split
                raw = LogMel(fcfg)
                frames = torch.cat([raw.raw(a) for a, _ in train[:300]])
                mean, invstd = frames.mean(0), 1.0 / frames.std(0).clamp_min(1e-4)
            logmel = LogMel(fcfg, mean, invstd)
            feats = [logmel(a) for a, _ in train]
            targets = [self.teacher.tokenizer.encode(t) for _, t in train]
            self._features[key] = (logmel, feats, targets, dev)
        return self._features[key]

    def cache_key(self, config: TrialConfig) -> str:
        ident = {"teacher": self.teacher.weights, "teacher_params": self.teacher.num_params(),
                 "teacher_info": str(self.teacher.info.get("train_steps")), "weights_key": config.weights_key(),
                 "settings": dataclasses.asdict(self.settings), "adapt_set": str(self.manifest)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def progress_dir(self, config: TrialConfig) -> Path:
        """Where the checks of this edit (whatever its step budget) are kept."""
        return self.cache_dir / "progress" / self.cache_key(config.replace(adapt_steps=0))

    @staticmethod
    def _save(blob: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, path)

    # -- adaptation ---------------------------------------------------------------------
    def __call__(self, edited: LoadedModel, config: TrialConfig,
                 on_progress: Optional[Callable[..., None]] = None) -> tuple[dict, dict]:
        path = self.cache_dir / f"{self.cache_key(config)}.pt"
        if path.exists():
            blob = torch.load(path, map_location="cpu", weights_only=False)
            return blob["state_dict"], dict(blob["info"], cached=True)
        snapshot = self.progress_dir(config) / f"step-{config.adapt_steps}.pt"
        if snapshot.exists():  # this step was reached before (by a run that went on or was stopped)
            blob = torch.load(snapshot, map_location="cpu", weights_only=False)
            self._replay(blob["info"]["history"], on_progress)
            state, info = blob["state_dict"], dict(blob["info"], resumed_from=config.adapt_steps)
        else:
            state, info = self.adapt(edited, config, on_progress)
        self._save({"state_dict": state, "info": info}, path)
        return state, dict(info, cached=False)

    @staticmethod
    def _report(on_progress, step: int, dev_wer: float, dev_errors: list) -> None:
        if on_progress is None:
            return
        try:
            wants_errors = len(inspect.signature(on_progress).parameters) >= 3
        except (TypeError, ValueError):
            wants_errors = False
        if wants_errors:
            on_progress(step, dev_wer, dev_errors)
        else:
            on_progress(step, dev_wer)

    def _replay(self, history: list, on_progress) -> None:
        for h in history:
            if "dev_wer" in h:
                self._report(on_progress, h["step"], h["dev_wer"], h.get("dev_errors", []))

    def adapt(self, edited: LoadedModel, config: TrialConfig,
              on_progress: Optional[Callable[[int, float], None]] = None) -> tuple[dict, dict]:
        s = self.settings
        t0 = time.perf_counter()
        logmel, feats, targets, dev_utts = self._features_for(edited.features)
        arch = edited.arch
        student = edited.model.to(self.device).train()
        teacher = self.teacher.model.to(self.device).eval()
        distill = s.distill_weight > 0 and edited.features.hop_samples == self.teacher.features.hop_samples
        pad = silence_frame(logmel)
        rng = random.Random(s.seed)
        lengths = [f.size(0) for f in feats]
        batches: list = []
        opt = torch.optim.AdamW(student.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=1e-3)
        history = []
        blank = edited.tokenizer.blank
        first, furthest = 1, 0
        progress = self.progress_dir(config)
        resume = progress / "resume.pt"
        if resume.exists():
            blob = torch.load(resume, map_location="cpu", weights_only=False)
            furthest = blob["step"]
            if blob["step"] < config.adapt_steps:  # continue where an earlier request stopped
                student.load_state_dict(blob["state_dict"])
                opt.load_state_dict(blob["optimizer"])
                rng.setstate(blob["rng"])
                torch.set_rng_state(blob["torch_rng"])
                batches, history, first = blob["batches"], blob["history"], blob["step"] + 1
                self._replay(history, on_progress)
        resumed_from = first - 1
        for step in range(first, config.adapt_steps + 1):
            if not batches:
                batches = make_batches(lengths, s.batch_frames, rng)
            idx = batches.pop()
            batch = collate([feats[i] for i in idx], [targets[i] for i in idx], arch["time_reduction_stride"],
                            arch["right_context_length"], pad)
            batch = tuple(t.to(self.device) for t in batch)
            for g in opt.param_groups:
                g["lr"] = s.lr * min(1.0, step / s.warmup_steps)
            loss, logits = rnnt_step_loss(student, None, batch, blank, 0.0)
            total = loss
            if distill:
                with torch.no_grad():
                    tb = batch
                    if arch["right_context_length"] != self.teacher.arch["right_context_length"]:
                        tb = collate([feats[i] for i in idx], [targets[i] for i in idx], arch["time_reduction_stride"],
                                     self.teacher.arch["right_context_length"], pad)
                        tb = tuple(t.to(self.device) for t in tb)
                    t_logits = rnnt_step_loss(teacher, None, tb, blank, 0.0)[1]
                if t_logits.shape == logits.shape:
                    kl = F.kl_div(logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
                    total = total + s.distill_weight * kl.mean()
            blocks = moe_blocks(student)
            if blocks and s.balance_weight > 0:
                total = total + s.balance_weight * sum(b.aux_loss for b in blocks) / len(blocks)
            if not torch.isfinite(total):
                raise DSEError(f"adaptation loss became {total.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)
            opt.step()
            history.append({"step": step, "loss": loss.item(), "total": total.item()})
            if step % s.check_every == 0 or step == config.adapt_steps:
                student.eval()
                probe = dataclasses.replace(edited, model=student, mean=logmel.mean, invstd=logmel.invstd)
                dev = streaming_wer(probe, dev_utts, beam_width=1)
                student.train()
                history[-1].update(dev_wer=dev["wer"], dev_errors=dev["utterance_errors"])
                self._checkpoint(progress, step, student, opt, rng, batches, history, logmel, distill, t0,
                                 resumable=step > furthest)
                self._report(on_progress, step, dev["wer"], dev["utterance_errors"])
        student.eval()
        for block in moe_blocks(student):  # drop the last graph so the model can be copied
            block.aux_loss = torch.zeros(())
        state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        info = self._info(config.adapt_steps, history, logmel, distill, t0)
        if resumed_from:
            info["resumed_from"] = resumed_from
        return state, info

    @staticmethod
    def _info(steps: int, history: list, logmel, distill: bool, t0: float) -> dict:
        checks = [h for h in history if "dev_wer" in h]
        thinned = history[:: max(1, len(history) // 20)]
        return {"steps": steps, "seconds": time.perf_counter() - t0, "distilled": distill,
                "final_dev_wer": checks[-1]["dev_wer"] if checks else None,
                "final_dev_errors": checks[-1].get("dev_errors") if checks else None,
                "history": sorted({h["step"]: h for h in thinned + checks}.values(), key=lambda h: h["step"]),
                "mean": logmel.mean.tolist(), "invstd": logmel.invstd.tolist()}

    def _checkpoint(self, progress: Path, step: int, student, opt, rng, batches, history, logmel,
                    distill: bool, t0: float, resumable: bool) -> None:
        """Keep this check: the weights (a snapshot any later request for ``step`` steps uses) and,
        when it is the furthest step yet, the state to continue from."""
        state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        self._save({"state_dict": state, "info": self._info(step, history, logmel, distill, t0)},
                   progress / f"step-{step}.pt")
        if not resumable:
            return
        self._save({"step": step, "state_dict": state, "optimizer": opt.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "batches": list(batches), "history": list(history)},
                   progress / "resume.pt")

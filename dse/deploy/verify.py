"""Re-measure an exported bundle here and compare with what its study recorded: ``python -m dse.verify DIR``.

Checks, in order:

1. Integrity: every file against ``MANIFEST.sha256``, and the bundle format version.
2. Accuracy: the bundle streams the eval set recorded at export (with its utterance
   limit; ``--eval-set`` when the set lives elsewhere on this machine) through
   :func:`dse.core.measure.measure`, the path the study timed and scored. WER and CER must
   equal the recorded values exactly, and each recorded transcript must be
   reproduced word for word; otherwise the exit status is 1. With ``--limit N`` (fewer
   utterances than the study), the WER of those N is compared with the errors the study
   recorded for the same N utterances, never with the whole set's WER.
3. Speed: the same-run speedup (:func:`dse.core.measure.interleaved_speedup`) of the bundle
   over an fp32 rebuild of its own architecture (int8 weights dequantised, a torch encoder
   also for a bundle that runs ONNX Runtime, the study baseline's beam width), beside the speedup the study recorded against its
   baseline. It is flagged when it falls outside the recorded 95 % interval; timing
   depends on the machine and its load, so a flag is a warning, not a failure.

Exit status: 0 verified, 1 accuracy differs from the record, 2 unusable bundle or input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dse.deploy import runtime
from dse.core.config import TrialConfig
from dse.core.errors import DSEError, cli_error, not_empty
from dse.core.knobs import KNOBS
from dse.core.record import TrialRecord

SPEEDUP_UTTERANCES = 8


def _arch_knobs() -> list[str]:
    """Knobs on which a study baseline can differ from the bundle's fp32 rebuild (which keeps the
    bundle's architecture, weights and compile mode): those that change the weights, and compile."""
    return [k for k, spec in KNOBS.items() if spec.weights or spec.transform == "compile"]


def _fmt(value: Optional[float]) -> str:
    return "not measured" if value is None else format(value, ".10g")


def _compare_transcripts(recorded: list[dict], measured: list[dict]) -> tuple[int, list[str], int]:
    """(identical count, descriptions of differences, recorded ids absent from this eval set)."""
    hyps = {t["id"]: t["hyp"] for t in measured}
    same, diffs, absent = 0, [], 0
    for t in recorded:
        if t["id"] not in hyps:
            absent += 1
        elif hyps[t["id"]] == t["hyp"]:
            same += 1
        else:
            diffs.append(f"{t['id']}: recorded {t['hyp']!r}, now {hyps[t['id']]!r}")
    return same, diffs, absent


def _baseline_differences(config: dict) -> list[str]:
    baseline = config.get("baseline_config") or {}
    trial = config["trial_config"]
    out = []
    for knob in _arch_knobs():
        b = baseline.get(knob)
        if b is not None and b != trial.get(knob):
            out.append(f"{knob} {b} (baseline) vs {trial.get(knob)} (bundle)")
    return out


def recorded_utterances(record: dict, ids: list[str]) -> Optional[list[tuple[int, int]]]:
    """The recorded ``(word errors, reference words)`` of the utterances ``ids`` (the first ones of
    the eval set the study measured, in its order), or None when the bundle does not hold them.

    From ``utterance_errors`` (every utterance, in eval order; bundles of this dse), else from the
    recorded transcripts (the first dozen, by id). Raises :class:`DSEError` when the recorded
    utterances are visibly others (other ids or reference word counts).
    """
    stored = TrialRecord.from_user_attrs(record)
    transcripts = stored.transcripts or []
    for i, t in enumerate(transcripts[:len(ids)]):
        if t.get("id") != ids[i]:
            raise DSEError(f"utterance {i + 1} of this eval set is {ids[i]!r}, the study measured {t.get('id')!r} "
                           "there: not the same eval set (pass --eval-set with the one the study used)")
    errors = stored.utterance_errors or []
    if len(errors) >= len(ids):
        return [tuple(e) for e in errors[:len(ids)]]
    by_id = {t["id"]: t for t in transcripts if "errors" in t and "words" in t}
    if all(i in by_id for i in ids):
        return [(by_id[i]["errors"], by_id[i]["words"]) for i in ids]
    return None


def _pooled(pairs) -> Optional[float]:
    words = sum(w for _, w in pairs)
    return sum(e for e, _ in pairs) / words if words else None


NOTHING_COMPARED = ("accuracy    not compared: the record holds no error rate and no transcript of these "
                    "utterances (random weights record none)")


def check_accuracy(recognizer, record: dict, audio, eval_set, limit: Optional[int],
                   subset: bool = False) -> tuple[list[str], list[str]]:
    """(report lines, problems) of re-scoring ``recognizer`` on ``audio`` (:class:`dse.core.measure.EvalAudio`).

    ``subset``: ``audio`` is the first utterances of the recorded eval set only (``--limit``), so
    its WER is compared with the recorded errors of those same utterances
    (:func:`recorded_utterances`), never with the whole set's WER; CER is then compared only
    when the recorded transcripts cover them. No problems means the compared error rates and
    the recorded transcripts are identical.
    """
    from dse.core.measure import measure, score

    result = measure(recognizer, audio, accuracy=True)
    stored = TrialRecord.from_user_attrs(record)
    recorded = stored.metrics
    lines = [f"eval set    {eval_set} ({result['utterances']} utterances"
             + (f", limit {limit}" if limit else "") + (f", {len(audio.skipped)} skipped" if audio.skipped else "") + ")"]
    problems = []
    measured_errors = [(t["errors"], t["words"]) for t in result.get("transcripts") or []]
    compared = {"wer": recorded.get("wer"), "cer": recorded.get("cer")}  # recorded values on these utterances
    not_compared = set()
    where = ""
    if subset and recorded.get("wer") is not None:
        pairs = recorded_utterances(record, audio.ids)
        if pairs is None:  # checked before measuring; kept for direct callers
            raise DSEError("this bundle does not record per-utterance errors for these utterances; "
                           "verify the whole eval set (no --limit)")
        if [w for _, w in pairs] != [w for _, w in measured_errors]:
            raise DSEError(f"the first {len(pairs)} utterances of {eval_set} have other reference texts than "
                           "the ones the study measured: not the same eval set")
        total = len(stored.utterance_errors or []) or "all"
        where = f" on these {len(pairs)} of {total} utterances"
        compared["wer"] = _pooled(pairs)
        by_id = {t["id"]: t for t in stored.transcripts or []}
        if all(i in by_id for i in audio.ids):
            compared["cer"] = score([by_id[i]["ref"] for i in audio.ids], [by_id[i]["hyp"] for i in audio.ids])["cer"]
        else:
            not_compared.add("cer")
    for key in ("wer", "cer"):
        rec, now = compared[key], result[key]
        if key in not_compared:
            lines.append(f"{key.upper():<11} measured {_fmt(now)}; not compared: the record holds per-utterance word "
                         "errors only (run without --limit to compare the CER)")
            continue
        if rec is None:
            lines.append(f"{key.upper():<11} recorded not measured (random weights), measured {_fmt(now)}")
            continue
        same = rec == now
        lines.append(f"{key.upper():<11} recorded {_fmt(rec)}{where}, measured {_fmt(now)}: "
                     f"{'identical' if same else 'DIFFERENT'}")
        if not same:
            problems.append(f"{key.upper()} mismatch: recorded {_fmt(rec)}{where}, measured {_fmt(now)}")
    same, diffs, absent = _compare_transcripts(stored.transcripts or [], result.get("transcripts") or [])
    total = same + len(diffs)
    if total:
        lines.append(f"transcripts {same} of {total} recorded transcripts identical"
                     + (f" ({absent} recorded utterances not in this eval set)" if absent else ""))
    if not total and all(compared[k] is None or k in not_compared for k in ("wer", "cer")):
        lines.append(NOTHING_COMPARED)
    if diffs:
        problems.append(f"{len(diffs)} transcript(s) differ from the record, first: {diffs[0]}")
    if problems and record.get("adapted_again"):
        problems.append("the bundle's weights were adapted again at export (the study's adapted weights were "
                        "not cached), which explains a difference")
    for problem in audio.skipped:
        lines.append(f"skipped     {problem}")
    return lines, problems


def check_speedup(bundle: Path, recognizer, config: dict, record: dict, audio, utterances: int,
                  threads: Optional[int] = None) -> list[str]:
    """Report lines for the same-run speedup over an fp32 rebuild, flagged outside the recorded interval;
    ``threads``: both sides' (``None``: as the trial ran)."""
    from dse.core.measure import interleaved_speedup, machine_fingerprint

    baseline = config.get("baseline_config") or {}
    # The baseline is a full TrialConfig dict; one saved before the temperature knob reads as 1.0.
    reference = runtime.load(bundle, compile=False, fp32_reference=True, threads=threads,
                             lm_weight=float(baseline.get("lm_weight", 0.0)),
                             temperature=TrialConfig.from_dict(baseline).temperature if baseline else None)
    reference.beam_width = baseline.get("beam_width", recognizer.beam_width)
    ratio = interleaved_speedup(recognizer, reference, audio, limit=utterances)
    interval = (f"[95% {ratio['speedup_ci95'][0]:.3f}, {ratio['speedup_ci95'][1]:.3f}]" if ratio["speedup_ci95"]
                else "(no interval: one utterance)")
    lm = f", LM weight {reference.lm_weight:g}" if reference.lm_weight else ", no LM"
    lines = [f"speedup     {ratio['speedup']:.3f} {interval} over an fp32 rebuild with beam width "
             f"{reference.beam_width}{lm} ({ratio['samples']} utterances, "
             f"{threads or config['trial_config'].get('threads')} thread(s))"]
    stored = TrialRecord.from_user_attrs(record)
    recorded = stored.metrics.get("speedup")
    ci = stored.metrics.get("speedup_ci95")
    if recorded is None:
        lines.append("            recorded: not measured")
        return lines
    lines.append(f"            recorded {recorded:.3f}"
                 + (f" [95% {ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + " against the study baseline")
    differences = _baseline_differences(config)
    if differences:
        lines.append("            note: the study baseline differs from this reference in "
                     + "; ".join(differences) + ", so the two ratios are not strictly comparable")
    if ci and not ci[0] <= ratio["speedup"] <= ci[1]:
        here = machine_fingerprint()["cpu_model"]
        then = (stored.machine or {}).get("cpu_model", "unknown")
        lines.append(f"FLAG        speedup {ratio['speedup']:.3f} is outside the recorded interval "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}]; measured on {here!r}, recorded on {then!r}: re-run on an idle "
                     "machine, with more --speedup-utterances, before trusting either figure")
    return lines


def check_lite(bundle: Path, record: dict, audio, threads: Optional[int]) -> list[str]:
    """Report lines for the torch-free runtime (:mod:`dse.deploy.lite`) on ``audio``: its WER against
    the recorded errors of the same utterances, paired, and how many transcripts are identical.

    Not an identity check: its numpy front end rounds differently from torch's in near-silent
    frames, so a transcript can differ; the paired WER difference says whether that matters."""
    from dse.core.measure import paired_wer_difference, word_errors
    from dse.deploy import lite

    recognizer = lite.load(bundle, threads=threads)  # a LiteError is a DSEError: main reports it
    hyps = [recognizer.transcribe(w.numpy()) for w in audio.waveforms]
    errors = word_errors(audio.texts, hyps)
    recorded = recorded_utterances(record, audio.ids)
    wer = _pooled(errors)
    lines = [f"lite        torch-free runtime (onnxruntime + numpy): WER {wer:.4f} over {len(errors)} utterances"
             if wer is not None else "lite        torch-free runtime: no reference words, WER not measured"]
    if recorded is not None and wer is not None and len(errors) >= 2 and [w for _, w in recorded] == [w for _, w in errors]:
        diff, lo, hi = paired_wer_difference(errors, recorded)
        lines.append(f"            recorded {_pooled(recorded):.4f} on the same utterances: difference {diff * 100:+.1f} pts "
                     f"[95% {lo * 100:+.1f}, {hi * 100:+.1f}] (paired bootstrap)")
    stored = {t["id"]: t["hyp"] for t in TrialRecord.from_user_attrs(record).transcripts or []}
    shared = [(stored[i], h) for i, h in zip(audio.ids, hyps) if i in stored]
    if shared:
        lines.append(f"            {sum(a == b for a, b in shared)} of {len(shared)} recorded transcripts identical")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dse.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory written by python -m dse.export")
    p.add_argument("--eval-set", metavar="MANIFEST", help="JSONL manifest or LibriSpeech directory (default: the eval set recorded "
                                      "in the bundle's config.json)")
    p.add_argument("--limit", type=int, metavar="N", help="first N utterances only (default: the limit the study used)")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads of torch and of an ONNX Runtime encoder "
                                                           "(default: the value the trial was measured with)")
    p.add_argument("--no-speedup", action="store_true", help="skip the speedup measurement (accuracy only)")
    p.add_argument("--lite", action="store_true",
                   help="also score the torch-free runtime (dse.deploy.lite: onnxruntime + numpy; bundles of "
                        "backend onnxruntime) on the same utterances, paired against the recorded errors")
    p.add_argument("--speedup-utterances", type=int, default=SPEEDUP_UTTERANCES, metavar="N",
                   help=f"utterances timed for the speedup ratio (default {SPEEDUP_UTTERANCES}, as a study)")
    args = p.parse_args(argv)
    bundle = Path(args.bundle)
    try:
        not_empty(args.eval_set, "--eval-set", "the eval set's manifest, or leave it out for the recorded one")
        for flag, value in (("--threads", args.threads), ("--speedup-utterances", args.speedup_utterances),
                            ("--limit", args.limit)):
            if value is not None and value < 1:
                raise DSEError(f"{flag} {value} must be at least 1")
        recognizer = runtime.load(bundle, threads=args.threads)  # it sets torch's threads when it decodes
        config = runtime.read_json(bundle, runtime.CONFIG_FILE)  # checked by load
        record = runtime.read_json(bundle, runtime.METRICS_FILE)
        stored = TrialRecord.from_user_attrs(record)
        eval_set = args.eval_set or config["eval"]["set"]
        if not eval_set:
            raise DSEError(f"{bundle}: no eval set recorded; pass --eval-set MANIFEST")
        if not args.eval_set and not Path(eval_set).exists():
            raise DSEError(f"the recorded eval set {eval_set} is not on this machine; pass --eval-set with its copy")
        recorded_limit = config["eval"]["limit"]
        limit = args.limit if args.limit is not None else recorded_limit
        if limit is not None and recorded_limit is not None and limit > recorded_limit:
            limit = recorded_limit  # the study measured no more than these
        recorded_count = len(stored.utterance_errors or [])
        print(f"bundle      {bundle} (study {config['study']['name']!r}, trial {config['study']['trial']}, "
              f"{config['trial_config']['precision']}): every file matches MANIFEST.sha256")
        from dse.core.measure import load_eval_audio

        audio = load_eval_audio(eval_set, limit)
        # fewer utterances than the study measured: compare with the record of those same ones
        subset = limit is not None and (limit < recorded_count if recorded_count else limit != recorded_limit)
        if subset and stored.metrics.get("wer") is not None and recorded_utterances(record, audio.ids) is None:
            raise DSEError(f"--limit {args.limit}: this bundle records the WER of its whole eval set but not the "
                           f"errors of each utterance, so a subset's WER has nothing to be compared with; "
                           "run without --limit, or export the bundle again with this dse")
        lines, problems = check_accuracy(recognizer, record, audio, eval_set, limit, subset=subset)
        print("\n".join(lines), flush=True)
        if args.lite:
            print("\n".join(check_lite(bundle, record, audio, args.threads)), flush=True)
        if not args.no_speedup:
            print("\n".join(check_speedup(bundle, recognizer, config, record, audio, args.speedup_utterances,
                                           args.threads)))
    except DSEError as exc:
        return cli_error(exc)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    if NOTHING_COMPARED in lines:
        print("verified: every file matches its checksum; accuracy not compared (nothing recorded to compare with)")
    else:
        print("verified: accuracy identical to the record")
    return 0


if __name__ == "__main__":
    sys.exit(main())

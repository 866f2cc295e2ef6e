"""Transcribe audio with an exported bundle, streaming: ``python -m dse.transcribe DIR INPUT [INPUT ...]``.

Each INPUT is an audio file in any format soundfile reads (any rate and channel
count: down-mixed to mono and resampled to 16 kHz), or ``-``: raw 16 kHz mono signed
16-bit little-endian PCM on standard input, decoded live, each chunk as soon as its
last sample arrives::

    arecord -f S16_LE -r 16000 -c 1 | python -m dse.transcribe deploy/moe-17 -

Output: one line per INPUT, in order, holding its final transcript. With
``--partial``, every chunk that changes the best hypothesis first prints
``[T s] partial text``, T being the audio time (s) the chunk waited for. An INPUT that
cannot be read (missing, corrupt, empty) gets an empty output line and one line on
standard error naming it; the others are still transcribed, and the exit status is then 2.
Audio is fed in the pieces a live stream delivers (the schedule the study timed),
so a file gives the transcript the study measured for it.
"""
from __future__ import annotations

import argparse
import sys
from typing import BinaryIO, Callable, Optional

import numpy as np
import torch

from dse.deploy import runtime
from dse.core.audio import read_audio
from dse.core.errors import AudioError, DSEError, cli_error, not_empty
from dse.core.stream import ChunkEvent, StreamingRecognizer

PCM_BYTES_PER_SAMPLE = 2
READ_BYTES = 1 << 16


def pcm16_to_float(data: bytes) -> torch.Tensor:
    """Little-endian signed 16-bit PCM -> float32 ``(samples,)`` in [-1, 1), as soundfile reads it."""
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0)


def stream_pcm(recognizer: StreamingRecognizer, source: BinaryIO,
               on_chunk: Optional[Callable[[ChunkEvent], None]] = None) -> str:
    """Stream raw PCM from ``source`` as it arrives, in the pieces of :func:`dse.deploy.runtime.piece_samples`.

    Reads whatever ``source`` has (up to 64 KiB at a time) and decodes each piece once
    it is complete, so the result equals :func:`dse.deploy.runtime.stream` on the same samples.
    """
    recognizer.reset()
    first, step = runtime.piece_samples(recognizer)
    need = first * PCM_BYTES_PER_SAMPLE
    buffer = bytearray()
    total = 0
    read = getattr(source, "read1", source.read)

    def feed(data: bytes) -> None:
        for event in recognizer.accept_audio(pcm16_to_float(data)):
            if on_chunk:
                on_chunk(event)

    while True:
        data = read(READ_BYTES)
        if not data:
            break
        total += len(data)
        buffer += data
        while len(buffer) >= need:
            feed(bytes(buffer[:need]))
            del buffer[:need]
            need = step * PCM_BYTES_PER_SAMPLE
    if total == 0:
        raise AudioError("standard input held no audio (0 bytes); expected raw 16 kHz mono 16-bit "
                         "little-endian PCM, e.g. from 'arecord -f S16_LE -r 16000 -c 1'")
    if total % PCM_BYTES_PER_SAMPLE:
        raise AudioError(f"standard input ended after {total} bytes, an odd count: not 16-bit PCM "
                         "(expected raw 16 kHz mono signed 16-bit little-endian samples)")
    if buffer:
        feed(bytes(buffer))
    for event in recognizer.finish():
        if on_chunk:
            on_chunk(event)
    return recognizer.text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dse.transcribe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory written by python -m dse.export")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="audio file (wav, flac, ogg, ...), or '-' for raw 16 kHz mono s16le PCM on standard input")
    p.add_argument("--partial", action="store_true",
                   help="also print '[T s] text' whenever a chunk changes the best hypothesis")
    p.add_argument("--threads", type=int, metavar="N",
                   help="intra-op threads (default: the value the trial was measured with)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the encoder eagerly even if the trial was timed with torch.compile")
    args = p.parse_args(argv)
    try:
        not_empty(args.bundle, "the bundle path", "the folder dse.export wrote")
        if args.inputs.count("-") > 1:
            raise DSEError("'-' (standard input) can be given only once")
        if args.threads is not None and args.threads < 1:
            raise DSEError(f"--threads {args.threads} must be at least 1")
        # the recognizer sets torch's threads when it decodes (1 beside an ONNX Runtime encoder)
        recognizer = runtime.load(args.bundle, compile=False if args.no_compile else None, threads=args.threads)
        rate = recognizer.logmel.config.sample_rate
        failed = 0
        for item in args.inputs:
            last = [""]

            def on_chunk(event: ChunkEvent) -> None:
                text = recognizer.text
                if args.partial and text != last[0]:
                    seconds = min(event.samples_needed, recognizer.samples_in) / rate
                    print(f"[{seconds:.2f} s] {text}", flush=True)
                last[0] = text

            try:
                if item == "-":
                    text = stream_pcm(recognizer, sys.stdin.buffer, on_chunk)
                else:
                    text = runtime.stream(recognizer, read_audio(item, target_rate_hz=rate), on_chunk)
            except AudioError as exc:  # this input only: say which, keep its line, go on with the rest
                failed += 1
                sys.stdout.flush()
                cli_error(exc if item != "-" else AudioError(f"-: {exc}"))
                text = ""
            print(text, flush=True)
    except DSEError as exc:
        return cli_error(exc)
    except KeyboardInterrupt:
        return 130
    if failed:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

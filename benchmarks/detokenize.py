"""Detokenising one long sequence: dstp's incremental stream against re-decoding each step.

    python benchmarks/detokenize.py [--tokens 1000] [--model PATH]

The tokenizer is the model's (default: the packaged stories260k, a
SentencePiece-style one); token ids are random, so byte runs and invalid UTF-8
are in the mix. Prints milliseconds for the whole sequence.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from transformers import AutoTokenizer

from dstp.engine.detokenizer import Detokenizer

STORIES = Path(__file__).resolve().parents[1] / "dstp" / "assets" / "stories260k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--model", default=str(STORIES))
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    rng = random.Random(0)
    ids = [rng.randrange(3, len(tok)) for _ in range(args.tokens)]
    prompt = tok.encode("Once upon a time")

    started = time.perf_counter()
    stream = Detokenizer(tok).stream(prompt)
    incremental = "".join(stream.step(t) for t in ids) + stream.flush()
    stream_ms = (time.perf_counter() - started) * 1e3

    started = time.perf_counter()
    for n in range(1, len(ids) + 1):
        whole = tok.decode(ids[:n], skip_special_tokens=True)
    redecode_ms = (time.perf_counter() - started) * 1e3

    full = tok.decode(prompt + ids, skip_special_tokens=True)
    same = tok.decode(prompt, skip_special_tokens=True) + incremental == full
    print(
        f"{args.tokens} tokens: incremental {stream_ms:.1f} ms, re-decode every step "
        f"{redecode_ms:.1f} ms (last text {len(whole)} chars); exact: {same}"
    )


if __name__ == "__main__":
    main()

"""The aspect path in-process: locating a message's aspects (clauses, one encoder call per clause, the
taxonomy match) with the encoder's u8 weights as stored against loaded as s8, on the held-out messages.

  python bench/aspects.py [--rounds 5] [--set distill/aspects/eval.tsv]

Why it exists: the service loads the encoder's weights as s8 on VNNI and AMX CPUs (service/weights.py)
and as stored elsewhere; this shows what that buys per clause and per message, and checks the two give
the same embeddings on this CPU. The two encoders take turns within every round; the figures are the
medians over rounds. On a CPU without VNNI or AMX the s8 row is left out: its products may saturate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.aspect_eval import ASPECT_SETS, load_aspect_set
from service.artifact import cpu_flags, cpu_model, runs_exactly
from service.aspects import AspectModel, SentenceEncoder, clauses
from service.settings import DEFAULT_ASPECT_MODEL_DIR
from service.taxonomy import DEFAULT_TAXONOMY, load_taxonomy
from service.weights import S8_FLAGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", type=Path, default=ASPECT_SETS / "eval.tsv")
    args = parser.parse_args()
    messages = [example.text for example in load_aspect_set(args.set)]
    pieces = [text[start:end] for text in messages for start, end in clauses(text)]
    taxonomy = load_taxonomy(DEFAULT_TAXONOMY)
    encoders = {"as stored (u8)": SentenceEncoder(DEFAULT_ASPECT_MODEL_DIR, threads=1, flags=set())}
    if runs_exactly(S8_FLAGS, cpu_flags()):
        encoders["s8"] = SentenceEncoder(DEFAULT_ASPECT_MODEL_DIR, threads=1)
    models = {name: AspectModel(encoder, taxonomy) for name, encoder in encoders.items()}
    print(f"{cpu_model()}; {len(messages)} messages, {len(pieces)} clauses ({args.set}), one thread")
    if "s8" in encoders:
        same = np.array_equal(encoders["s8"].embed(pieces), encoders["as stored (u8)"].embed(pieces))
        print(f"s8 embeddings identical to u8 on every clause: {same}")
    per_clause: dict[str, list[float]] = {name: [] for name in encoders}
    per_message: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(args.rounds):
        for name in encoders:
            start = time.perf_counter()
            encoders[name].embed(pieces)
            per_clause[name].append((time.perf_counter() - start) * 1000 / len(pieces))
            start = time.perf_counter()
            models[name].locate(messages)
            per_message[name].append((time.perf_counter() - start) * 1000 / len(messages))
    first = next(iter(encoders))
    print(f"{'encoder weights':<16} {'ms/clause':>10} {'ms/message':>11} {'speed-up':>9}")
    for name in encoders:
        clause, message = statistics.median(per_clause[name]), statistics.median(per_message[name])
        print(f"{name:<16} {clause:>10.2f} {message:>11.2f} "
              f"{statistics.median(per_message[first]) / message:>8.2f}x")


if __name__ == "__main__":
    main()

"""Time an artefact's int8 builds on this CPU and record the figures, with the CPU, in its manifest.

  python -m export.latency [models/sentiment-minilm-int8] [--force]

Why it exists: the export times a build only where this CPU runs it as its own CPUs do, so an artefact
exported on an AVX2-only machine leaves its `vnni` build's latency empty. Run on a VNNI (or AMX) machine,
this fills it in; figures already there are kept unless --force. The model files are not touched, so
their hashes still hold.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.artifact import MANIFEST_FILE, TOKENIZER_FILE, cpu_flags, cpu_model, load_artifact, runs_exactly
from service.runner import cpu_session
from service.settings import DEFAULT_MODEL_DIR
from service.tokenization import TextEncoder

BATCHES = (1, 32)
SAMPLE_TEXTS = 32  # the first test texts under 200 characters: short messages, as served


def latency_sample(texts: list[str]) -> list[str]:
    """The texts every latency figure is timed on (the export's and this tool's alike)."""
    return [text for text in texts if len(text) < 200][:SAMPLE_TEXTS] or texts[:SAMPLE_TEXTS]


def latency_ms(model: Path | str | bytes, encoder: TextEncoder, texts: list[str], batch: int,
               rounds: int = 20) -> float:
    """Median wall time of one batch (same texts every round, every core), in milliseconds; `model`: a file,
    or a model's bytes (Artifact.model_source)."""
    session = cpu_session(model)
    feeds = encoder.feeds([e.ids for e in encoder.encode((texts * batch)[:batch])],
                          {i.name for i in session.get_inputs()})
    session.run(None, feeds)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.median(times)), 2)


def variant_latency(model: Path | str | bytes, encoder: TextEncoder, texts: list[str]) -> dict[str, Any]:
    return {**{f"batch{b}_ms": latency_ms(model, encoder, texts, b) for b in BATCHES}, "measured_on": cpu_model()}


def fill_latencies(directory: Path, texts: list[str], force: bool = False,
                   flags: set[str] | None = None) -> list[str]:
    """Time every variant this CPU runs exactly whose latency is empty (all of them with `force`) and write
    the manifest back; returns the names timed."""
    path = directory / MANIFEST_FILE
    raw = json.loads(path.read_text())
    encoder = TextEncoder(directory / TOKENIZER_FILE, raw["max_tokens"], raw.get("head_tokens"))
    flags = cpu_flags() if flags is None else flags
    timed = []
    for variant in raw.get("variants", []):
        evaluation = variant.setdefault("evaluation", {})
        if runs_exactly(tuple(variant.get("requires_any", ())), flags) and (force or not evaluation.get("latency")):
            source = load_artifact(directory, variant=variant["name"], flags=flags).model_source()
            evaluation["latency"] = variant_latency(source, encoder, texts)
            timed.append(variant["name"])
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return timed


def main() -> int:
    from distill.data import LOADERS, load_all, sample

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, nargs="?", default=DEFAULT_MODEL_DIR)
    parser.add_argument("--force", action="store_true", help="time every variant this CPU runs, not just empty ones")
    args = parser.parse_args()
    cap = json.loads((args.model_dir / MANIFEST_FILE).read_text()).get("evaluation", {}).get("per_source_cap")
    examples = load_all(list(LOADERS))
    test = sample(examples, "test", cap) if cap else [ex for ex in examples if ex.split == "test"]
    texts = latency_sample([ex.text for ex in test])  # the export's own: the same held-out texts, the same cap
    timed = fill_latencies(args.model_dir, texts, args.force)
    print(f"{cpu_model()}: timed {', '.join(timed) or 'nothing (every figure this CPU can give is there)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

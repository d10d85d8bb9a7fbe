"""Ray Serve peer for the serving benchmark: the same model file behind `@serve.batch`, as a Ray user
would write it. Runs in its own virtualenv (`make ray-venv`: ray[serve], onnxruntime, tokenizers), so Ray
never enters the project's dependencies.

  .cache/ray-venv/bin/python bench/ray_peer.py --model DIR --port N [--batch 32] [--wait-ms 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.artifact import load_artifact  # noqa: E402 (standard library only)


def deployment(model_dir: Path, batch: int, wait_ms: float) -> Any:
    import numpy as np
    import onnxruntime as ort
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from tokenizers import Tokenizer

    @serve.deployment(max_ongoing_requests=256)
    class Sentiment:
        def __init__(self) -> None:
            artifact = load_artifact(model_dir)
            self.labels = list(artifact.manifest.labels)
            self.tokenizer = Tokenizer.from_file(str(artifact.tokenizer_path))
            self.tokenizer.enable_truncation(artifact.manifest.max_tokens)
            self.tokenizer.enable_padding()
            self.session = ort.InferenceSession(artifact.model_source(), providers=["CPUExecutionProvider"])

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=wait_ms / 1000)
        async def classify(self, texts: list[str]) -> list[dict[str, Any]]:
            encoded = self.tokenizer.encode_batch(texts)
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                     "token_type_ids": np.zeros_like(ids)}
            logits = self.session.run(None, feeds)[0]
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            return [{"label": self.labels[int(row.argmax())], "score": float(row.max())} for row in probs]

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":
                return JSONResponse({"status": "ready"})
            body = await request.json()
            texts = body["texts"] if "texts" in body else [body["text"]]
            return JSONResponse({"results": [await self.classify(text) for text in texts]})

    return Sentiment.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(deployment(args.model, args.batch, args.wait_ms), route_prefix="/")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()

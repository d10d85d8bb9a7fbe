"""The committed model, served over real HTTP, gives a text the same scores alone and inside any batch the
service forms around it: its activation ranges are fixed at export (static int8), so neither the
neighbours nor their padding reach a text's scores."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from loadtests.messages import MESSAGES
from service.artifact import MANIFEST_FILE
from service.settings import DEFAULT_MODEL_DIR
from tests.conftest import Service, running_service


@pytest.fixture(scope="module")
def default_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("logs"), SENTIMENT_MAX_WAIT_MS="5") as svc:
        yield svc


def test_every_variant_of_the_committed_model_has_static_ranges() -> None:
    manifest = json.loads((DEFAULT_MODEL_DIR / MANIFEST_FILE).read_text())
    assert manifest["quantization"]["mode"] == "static-int8", manifest["quantization"]
    for variant in manifest["variants"]:
        assert variant["quantization"]["mode"] == "static-int8", variant


def test_a_texts_scores_do_not_depend_on_what_it_is_batched_with(default_service: Service) -> None:
    with default_service.client() as client:
        alone = {text: client.post("/v1/sentiment", json={"texts": [text]}).json()["results"][0]
                 for text in MESSAGES}
        rng = random.Random(7)
        # 2 to 8 texts of different lengths per request (padding, neighbours), 8 requests in flight at once
        requests = [rng.sample(MESSAGES, rng.randint(2, 8)) for _ in range(24)]

        def post(texts: list[str]) -> list[dict]:
            response = client.post("/v1/sentiment", json={"texts": texts})
            assert response.status_code == 200, response.text
            return response.json()["results"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, requests))
    # The int8 products are exact on every CPU; the float parts (softmax over a padded row, layer norm) run
    # in other kernels elsewhere and may round a last digit differently. Measured here: equal to the digit.
    # 2.0.0, with dynamic ranges, moved these scores by up to 0.055 and 0.58% of dev labels.
    for texts, results in zip(requests, answers, strict=True):
        for text, got in zip(texts, results, strict=True):
            assert got["label"] == alone[text]["label"], (text, got, alone[text])
            for label, score in alone[text]["scores"].items():
                assert abs(got["scores"][label] - score) <= 1e-5, (text, got, alone[text])

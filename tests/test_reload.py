"""Hot reload: another model swapped in under load with no failed request; a bad artefact refused with a
clear error while the old model keeps serving; the admin route exists only with a key, and needs it."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import time
import weakref
from pathlib import Path

import httpx
import pytest

from service.artifact import MANIFEST_FILE
from service.scoring import YOUNG_COLLECTION_ALLOCATIONS, settle_heap
from tests.conftest import rehash, running_service, served_file

KEY = "admin-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def copy_model(source: Path, target: Path, **manifest: object) -> Path:
    shutil.copytree(source, target)
    data = json.loads((target / MANIFEST_FILE).read_text())
    (target / MANIFEST_FILE).write_text(json.dumps({**data, **manifest}))
    return target


@pytest.fixture(scope="module")
def admin_service(tiny_model, tmp_path_factory):
    with running_service(tiny_model, tmp_path_factory.mktemp("reload"), SENTIMENT_ADMIN_KEY=KEY) as svc:
        yield svc


def test_a_reload_under_load_fails_no_request(admin_service, tiny_model, tmp_path) -> None:
    new = copy_model(tiny_model, tmp_path / "v2", version="0.0.2")
    outcomes: list[int] = []

    async def scenario() -> httpx.Response:
        until = time.monotonic() + 60

        async def client_loop() -> None:
            async with httpx.AsyncClient(base_url=admin_service.url, timeout=30) as client:
                while time.monotonic() < until:
                    response = await client.post("/v1/sentiment", json={"texts": ["late again", "lovely staff"]})
                    outcomes.append(response.status_code)

        clients = [asyncio.create_task(client_loop()) for _ in range(8)]
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=admin_service.url, timeout=60) as admin:
            answer = await admin.post("/admin/reload", json={"model_dir": str(new)}, headers=AUTH)
        until = time.monotonic() + 0.5  # keep the load on a moment past the swap
        await asyncio.gather(*clients)
        return answer

    answer = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"]["version"] == "0.0.2" and body["previous"]["version"] == "0.0.1"
    assert len(outcomes) > 50 and set(outcomes) == {200}
    with admin_service.client() as client:
        assert client.get("/v1/model").json()["version"] == "0.0.2"
        assert 'version="0.0.2"' in client.get("/metrics").text


def test_a_bad_artefact_is_refused_and_the_old_model_keeps_serving(admin_service, tiny_model, tmp_path) -> None:
    mismatched = copy_model(tiny_model, tmp_path / "mismatched", version="9.9.9")
    served_file(mismatched).write_bytes(served_file(mismatched).read_bytes()[:-10])
    garbage = copy_model(tiny_model, tmp_path / "garbage", version="9.9.8")
    served_file(garbage).write_bytes(b"not an onnx model at all")
    rehash(garbage)
    with admin_service.client() as client:
        before = client.get("/v1/model").json()["version"]
        for directory, says in ((mismatched, "sha256"), (garbage, "could not be loaded"),
                                (tmp_path / "missing", "not found")):
            refused = client.post("/admin/reload", json={"model_dir": str(directory)}, headers=AUTH)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "invalid_model" and says in refused.json()["error"]["message"]
            assert client.post("/v1/sentiment", json={"text": "still fine?"}).status_code == 200
        assert client.get("/v1/model").json()["version"] == before


def test_the_admin_route_needs_its_key_and_exists_only_with_one(admin_service, service) -> None:
    with admin_service.client() as client:
        assert client.post("/admin/reload", json={}).status_code == 401
        assert client.post("/admin/reload", json={}, headers={"authorization": "Bearer nope"}).status_code == 401
    with service.client() as client:
        missing = client.post("/admin/reload", json={}, headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_settling_the_heap_freezes_it_and_a_second_settle_frees_cycles_frozen_by_the_first() -> None:
    class Node:
        pass

    cycle = Node()
    cycle.self = cycle  # only the cyclic collector can free it
    alive = weakref.ref(cycle)
    thresholds = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: out of the collector's reach, as the start-up heap is
        settle_heap()  # after a reload: what the retired engine left in cycles is collected
        assert alive() is None and gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == YOUNG_COLLECTION_ALLOCATIONS
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)

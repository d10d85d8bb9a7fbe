"""Shared fixtures: a tiny model built through the project's own train + export path, the real
embedded teacher, and the real service started as a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.launch import start_service
from service.teacher_process import EmbeddedTeacher, free_port

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_module(*args: str, check: bool = True, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def metric(text: str, series: str) -> float:
    """The sum of a Prometheus exposition's samples whose line starts with `series`."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


def served_file(model_dir: Path) -> Path:
    """The model file this CPU is served from (model.onnx, or a faster variant the manifest lists)."""
    from service.artifact import load_artifact

    return load_artifact(model_dir, verify_hash=False).model_path


def rehash(model_dir: Path) -> None:
    """Make the manifest's hashes match the files again (for tests that break a model on purpose)."""
    from service.artifact import MANIFEST_FILE, MODEL_FILE, sha256_of

    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_of(model_dir / MODEL_FILE)
    for variant in manifest.get("variants", []):
        variant["sha256"] = sha256_of(model_dir / variant["file"])
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def build_tiny_backbone(directory: Path) -> Path:
    """MiniLM cut to its first layer: real embeddings, so 80 steps learn real sentiment in seconds."""
    import shutil

    from transformers import AutoModel

    from distill.data import backbone_dir

    AutoModel.from_pretrained(backbone_dir(), num_hidden_layers=1).save_pretrained(directory)
    shutil.copy(backbone_dir() / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def teacher() -> Iterator[EmbeddedTeacher]:
    """The real embedded teacher (llama.cpp server with SmolLM2-135M) on a free loopback port."""
    server = EmbeddedTeacher()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def label_cache(tmp_path_factory: pytest.TempPathFactory, teacher: EmbeddedTeacher) -> Path:
    """Teacher answers for a few dozen train texts, produced by the real labelling command."""
    cache = tmp_path_factory.mktemp("teacher") / "answers.jsonl"
    run_module("distill", "label", "--teacher-url", teacher.url, "--teacher-model", teacher.model_name,
               "--constraint", "gbnf", "--sources", "tweets", "rotten_tomatoes", "--per-source", "12",
               "--rewrite-per-source", "3", "--cache", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, label_cache: Path) -> Path:
    """A real artefact directory: tiny backbone -> distill train (human + teacher) -> export (int8, gate)."""
    work = tmp_path_factory.mktemp("pipeline")
    backbone = build_tiny_backbone(work / "backbone")
    run_module("distill", "train", "--backbone", str(backbone), "--sources", "tweets", "rotten_tomatoes",
               "--cap", "tweets=400", "rotten_tomatoes=400", "--epochs", "5", "--max-steps", "80",
               "--dev-per-source", "40",
               "--max-tokens", "48", "--head-tokens", "16", "--lr", "3e-4", "--teacher-cache", str(label_cache),
               "--out", str(work / "checkpoint"))
    run_module("export", "--checkpoint", str(work / "checkpoint"), "--out", str(work / "model"),
               "--sources", "tweets", "rotten_tomatoes", "--eval-per-source", "80", "--name", "tiny-test",
               "--version", "0.0.1", "--min-agreement", "0.95", "--max-accuracy-drop", "0.05",
               "--mixed", "1", "3")
    return work / "model"


class Service:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


@contextlib.contextmanager
def running_service(model_dir: Path, log_dir: Path, wait_ready: bool = True, **env: str) -> Iterator[Service]:
    """The real service (`python -m service`) on a free port; stopped with SIGTERM at the end."""
    settings = {"SENTIMENT_MODEL_DIR": str(model_dir), "SENTIMENT_HOST": "127.0.0.1", "SENTIMENT_LOG_LEVEL": "INFO",
                "SENTIMENT_TEACHER_ENABLED": "false", "SENTIMENT_WARMUP_ROUNDS": "1",
                # A fixed layout, so batching behaves the same on every CPU; test_layout measures the auto one.
                "SENTIMENT_LAYOUT": "1x2", "SENTIMENT_MAX_BATCH_SIZE": "32", "SENTIMENT_MAX_BATCH_TOKENS": "8192",
                **env}
    log = log_dir / f"service-{free_port()}.log"
    process, url = start_service(settings, wait=60, log=log, probe="ready" if wait_ready else "live")
    service = Service(url, process, log)
    try:
        yield service
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def service(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tiny_model, tmp_path_factory.mktemp("logs"), SENTIMENT_MAX_TEXTS="8",
                         SENTIMENT_MAX_TEXT_CHARS="2000", SENTIMENT_MAX_BODY_BYTES="20000") as svc:
        yield svc

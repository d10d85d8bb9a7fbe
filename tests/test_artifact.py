"""The artefact's int8 variants: which one a CPU gets, what is refused, and that the export's activation
smoothing changes nothing in fp32 (so every difference left is int8's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.__main__ import SMOOTHING
from export.onnx import export_fp32
from export.smooth import smooth_model
from service.artifact import MANIFEST_FILE, MODEL_FILE, ArtifactError, cpu_flags, load_artifact, sha256_of
from service.tokenization import TextEncoder
from tests.conftest import run_module

VNNI_FLAGS = ["avx512_vnni", "avx_vnni", "amx_int8"]


@pytest.fixture
def two_variants(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny artefact with a second build, listed first, that needs a VNNI flag."""
    directory = tmp_path / "model"
    shutil.copytree(tiny_model, directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    portable = {"name": "portable", "file": MODEL_FILE, "sha256": sha256_of(directory / MODEL_FILE)}
    shutil.copy(directory / MODEL_FILE, directory / "model-fast.onnx")
    (directory / "model-fast.onnx").write_bytes((directory / MODEL_FILE).read_bytes() + b"\0")  # another hash
    fast = {"name": "fast", "file": "model-fast.onnx", "sha256": sha256_of(directory / "model-fast.onnx"),
            "requires_any": VNNI_FLAGS}
    manifest["variants"] = [fast, portable]
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


@pytest.mark.parametrize(("flags", "chosen"), [({"avx2", "fma"}, "portable"), (set(), "portable"),
                                                ({"avx2", "avx512_vnni"}, "fast"), ({"avx2", "amx_int8"}, "fast"),
                                                ({"avx2", "avx_vnni"}, "fast")])
def test_each_cpu_gets_the_first_variant_it_runs_exactly(two_variants: Path, flags: set[str], chosen: str) -> None:
    artifact = load_artifact(two_variants, flags=flags)
    assert artifact.variant.name == chosen
    assert artifact.model_path == two_variants / artifact.variant.file
    if chosen == "portable":
        assert "not fast: needs one of avx512_vnni" in artifact.reason
    else:
        assert artifact.reason.startswith("fast: this CPU has ")


def test_a_variant_can_be_named_but_not_forced_onto_a_cpu_without_its_flags(two_variants: Path) -> None:
    assert load_artifact(two_variants, variant="portable", flags={"avx512_vnni"}).variant.name == "portable"
    with pytest.raises(ArtifactError, match="'fast' needs one of the CPU flags avx512_vnni, avx_vnni, amx_int8"):
        load_artifact(two_variants, variant="fast", flags={"avx2"})
    with pytest.raises(ArtifactError, match=r"'turbo' is not in this artefact \(it has fast, portable\)"):
        load_artifact(two_variants, variant="turbo", flags={"avx2"})


def test_a_broken_variant_list_is_refused_naming_the_problem(two_variants: Path) -> None:
    manifest_path = two_variants / MANIFEST_FILE
    good = json.loads(manifest_path.read_text())
    (two_variants / "model-fast.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match=r"model-fast\.onnx: sha256 .* does not match"):
        load_artifact(two_variants, flags={"avx512_vnni"})
    assert load_artifact(two_variants, flags={"avx2"}).variant.name == "portable"  # only the chosen file is read
    for variants, says in ((list(reversed(good["variants"])), "last variant must need no CPU flag"),
                           ([{"name": "x", "file": MODEL_FILE}], r"variants\[0\] is missing"),
                           ([{**good["variants"][1], "file": "../model.onnx"}], "a file name in the model directory"),
                           ("fast", "variants must be a list of objects")):
        manifest_path.write_text(json.dumps({**good, "variants": variants}))
        with pytest.raises(ArtifactError, match=says):
            load_artifact(two_variants, flags={"avx2"})
    (two_variants / "model-fast.onnx").unlink()
    manifest_path.write_text(json.dumps(good))
    with pytest.raises(ArtifactError, match=r"model-fast\.onnx: required file is missing \(variant fast\)"):
        load_artifact(two_variants, flags={"avx512_vnni"})


def test_the_export_builds_the_variants_this_cpu_can_check(tiny_model: Path) -> None:
    artifact = load_artifact(tiny_model)
    variants = {v["name"]: v for v in artifact.manifest.variants}
    has_vnni = bool(cpu_flags().intersection(VNNI_FLAGS))
    assert list(variants) == (["vnni", "portable"] if has_vnni else ["portable"])
    assert artifact.variant.name == ("vnni" if has_vnni else "portable")
    assert variants["portable"]["file"] == MODEL_FILE and variants["portable"]["quantization"]["weights"] == "u8"
    for variant in variants.values():
        assert sha256_of(tiny_model / variant["file"]) == variant["sha256"]
        quantization = variant["quantization"]
        # conftest asks for --mixed 1 3: the candidates are the ones asked for, not the defaults
        assert set(quantization["dev_agreement"]) == {"plain", *(f"smooth{a}" for a in SMOOTHING), "mixed1", "mixed3"}
        assert quantization["candidate"] in quantization["dev_agreement"]
        assert variant["evaluation"]["gate"]["passed"]
        assert set(variant["evaluation"]["accuracy"]) == {"tweets", "rotten_tomatoes"}


def test_smoothing_changes_nothing_in_fp32(tiny_model: Path, tmp_path: Path) -> None:
    fp32 = export_fp32(tiny_model.parent / "checkpoint", tmp_path / "fp32")
    encoder = TextEncoder(tiny_model / "tokenizer.json", 48, 16)
    texts = ["The parcel came late and support never answered.", "Lovely!", "ok I guess, price was fine"]
    feeds = []
    for encoded in encoder.encode(texts):
        ids, mask = encoder.pad([encoded.ids])
        feeds.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    record = smooth_model(fp32, tmp_path / "smoothed.onnx", feeds[:2], alpha=0.8)
    assert record["activations"] > 0
    before = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(tmp_path / "smoothed.onnx"), providers=["CPUExecutionProvider"])
    for feed in feeds:
        expected, smoothed = before.run(None, feed)[0], after.run(None, feed)[0]
        np.testing.assert_allclose(smoothed, expected, rtol=1e-3, atol=1e-4)


def test_the_service_refuses_a_variant_it_cannot_serve(tiny_model: Path) -> None:
    result = run_module("service", check=False, env={"SENTIMENT_MODEL_DIR": str(tiny_model),
                                                     "SENTIMENT_MODEL_VARIANT": "turbo"})
    assert result.returncode == 2 and "model variant 'turbo' is not in this artefact" in result.stderr

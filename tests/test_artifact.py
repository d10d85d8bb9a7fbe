"""The artefact's int8 variants: which one a CPU gets, what is refused; that the export's activation
smoothing changes nothing in fp32 (so every difference left is int8's), that static activation ranges
make a text's scores independent of its batch, that embedding tables are rounded per column, and that
the u8 twin computes an s8 build exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.__main__ import SMOOTHING
from export.latency import fill_latencies
from export.onnx import export_fp32, quantize_int8
from export.smooth import smooth_model
from export.static import fix_activation_ranges
from service.artifact import (
    MANIFEST_FILE,
    MODEL_FILE,
    ArtifactError,
    cpu_flags,
    cpu_model,
    load_artifact,
    sha256_of,
)
from service.runner import cpu_session
from service.tokenization import TextEncoder
from service.weights import S8_FLAGS, WEIGHT_INPUTS, s8_weights
from tests.conftest import run_module

VNNI_FLAGS = list(S8_FLAGS)


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
                           ("fast", "variants must be a list of objects"),
                           ([{**good["variants"][0], "load_weights_as": "s4"}, good["variants"][1]],
                            "load_weights_as must be")):
        manifest_path.write_text(json.dumps({**good, "variants": variants}))
        with pytest.raises(ArtifactError, match=says):
            load_artifact(two_variants, flags={"avx2"})
    (two_variants / "model-fast.onnx").unlink()
    manifest_path.write_text(json.dumps(good))
    with pytest.raises(ArtifactError, match=r"model-fast\.onnx: required file is missing \(variant fast\)"):
        load_artifact(two_variants, flags={"avx512_vnni"})


def test_the_export_writes_one_file_and_a_vnni_variant_of_it(tiny_model: Path) -> None:
    artifact = load_artifact(tiny_model)
    variants = {v["name"]: v for v in artifact.manifest.variants}
    has_vnni = bool(cpu_flags().intersection(VNNI_FLAGS))
    assert list(variants) == ["vnni", "portable"]
    assert artifact.variant.name == ("vnni" if has_vnni else "portable")
    assert sorted(path.name for path in tiny_model.glob("*.onnx")) == [MODEL_FILE]
    assert variants["vnni"]["file"] == variants["portable"]["file"] == MODEL_FILE
    assert variants["vnni"]["load_weights_as"] == "s8" and "load_weights_as" not in variants["portable"]
    assert variants["portable"]["quantization"]["weights"] == "u8"
    assert sha256_of(tiny_model / MODEL_FILE) == variants["vnni"]["sha256"] == variants["portable"]["sha256"]
    quantization = variants["portable"]["quantization"]
    # conftest asks for --mixed 1 3: the candidates are the ones asked for, not the defaults, each twice
    plans = ["plain", *(f"smooth{a}" for a in SMOOTHING), "mixed1", "mixed3"]
    assert set(quantization["dev_agreement"]) == {*plans, *(f"{plan}+static" for plan in plans)}
    assert quantization["candidate"] in quantization["dev_agreement"]
    assert quantization["mode"] == ("static-int8" if quantization["candidate"].endswith("+static") else "dynamic-int8")
    for variant in variants.values():
        assert variant["evaluation"]["gate"]["passed"]
        assert set(variant["evaluation"]["accuracy"]) == {"tweets", "rotten_tomatoes"}
    assert variants["portable"]["evaluation"]["latency"]["measured_on"] == cpu_model()
    assert bool(variants["vnni"]["evaluation"]["latency"]) == has_vnni  # timed only where it runs as its CPUs do


def test_latency_is_filled_in_for_the_builds_this_cpu_runs_exactly(tiny_model: Path, tmp_path: Path) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model, directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for variant in manifest["variants"]:
        variant["evaluation"]["latency"] = {}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    texts = ["Lovely!", "The parcel came late and support never answered."]

    def latencies() -> dict[str, dict]:
        return {v["name"]: v["evaluation"]["latency"]
                for v in json.loads((directory / MANIFEST_FILE).read_text())["variants"]}

    assert fill_latencies(directory, texts, flags={"avx2"}) == ["portable"]  # s8 on AVX2 alone is not exact
    assert latencies()["vnni"] == {}
    first = latencies()["portable"]
    assert first["measured_on"] == cpu_model() and first["batch1_ms"] > 0 and first["batch32_ms"] > 0
    assert fill_latencies(directory, texts, flags={"avx2", "avx512_vnni"}) == ["vnni"]  # figures there are kept
    assert latencies()["portable"] == first and latencies()["vnni"]["batch32_ms"] > 0
    assert fill_latencies(directory, texts, force=True, flags={"avx2"}) == ["portable"]
    assert load_artifact(directory, flags={"avx2"}).manifest.variants == tuple(
        json.loads((directory / MANIFEST_FILE).read_text())["variants"])  # still a valid artefact, hashes intact


def _feeds(encoder: TextEncoder, texts: list[str]) -> dict[str, np.ndarray]:
    return encoder.feeds([encoded.ids for encoded in encoder.encode(texts)], {"token_type_ids"})


def _logits(model: Path | bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return cpu_session(model).run(None, feeds)[0]


BATCH = ["The parcel came late and support never answered.", "Lovely!", "ok I guess, price was fine",
         "Refund took three weeks and two phone calls, never again with this shop."]


def test_static_ranges_make_a_texts_scores_independent_of_its_batch(tiny_model: Path, tmp_path: Path) -> None:
    encoder = TextEncoder(tiny_model / "tokenizer.json", 48, 16)
    fp32 = export_fp32(tiny_model.parent / "checkpoint", tmp_path / "fp32")
    dynamic, static = tmp_path / "dynamic.onnx", tmp_path / "static.onnx"
    quantize_int8(fp32, dynamic, "u8")
    record = fix_activation_ranges(dynamic, static, [_feeds(encoder, [text]) for text in BATCH[:3]])
    assert record["mode"] == "static-int8" and record["activation_ranges"]["calibration_texts"] == 3
    ops = [node.op_type for node in onnx.load(str(static)).graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    assert ops.count("MatMulIntegerToFloat") == record["activation_ranges"]["fused_matmuls"] > 0
    session = ort.InferenceSession(str(static), providers=["CPUExecutionProvider"])
    batched = session.run(None, _feeds(encoder, BATCH))[0]
    for row, text in enumerate(BATCH):  # alone: no padding, no neighbours; the same scores (bit for bit on
        # an AVX2 Zen 3; 1e-5 leaves room for float kernels that round differently on other CPUs)
        np.testing.assert_allclose(session.run(None, _feeds(encoder, [text]))[0][0], batched[row], rtol=0, atol=1e-5)
    # the same int8 weights with dynamic ranges: close, not equal (another activation scale)
    np.testing.assert_allclose(batched, _logits(dynamic, _feeds(encoder, BATCH)), atol=0.25)


def test_embedding_tables_are_rounded_per_column(tiny_model: Path, tmp_path: Path) -> None:
    fp32 = export_fp32(tiny_model.parent / "checkpoint", tmp_path / "fp32")
    int8 = tmp_path / "int8.onnx"
    assert quantize_int8(fp32, int8, "u8")["embedding_tables"] == "per-column u8"
    tables = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(fp32)).graph.initializer}
    model = onnx.load(str(int8))
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    looked_up = {}  # DequantizeLinear output -> (fp32 table, its per-column scale, the Gather's ids input)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and producer[node.input[0]].op_type == "Gather":
            gather = producer[node.input[0]]
            table = tables[gather.input[0].removesuffix("_quantized")]
            scale = inits[node.input[1]]
            assert scale.shape == (table.shape[1],)  # one step per hidden dimension, not one per table
            assert scale.max() > 1.5 * scale.min()  # (the columns' ranges do differ)
            looked_up[node.output[0]] = (table, scale, gather.input[1])
    assert len(looked_up) == 3  # words, positions, token types
    # ONNX Runtime's own lookups: every value within half a step of its column's fp32 value
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in looked_up)
    encoder = TextEncoder(tiny_model / "tokenizer.json", 48, 16)
    feeds = _feeds(encoder, BATCH)
    session = cpu_session(model.SerializeToString())
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    ids = {"input_ids": feeds["input_ids"], "token_type_ids": np.zeros_like(feeds["input_ids"])}
    for name, (table, scale, ids_input) in looked_up.items():
        got = outputs[name]
        rows = ids.get(ids_input)
        want = table[rows] if rows is not None else table[: got.shape[-2]]  # positions: 0 .. length-1
        assert np.all(np.abs(got - want) <= scale / 2 + 1e-6), name


def test_the_s8_weights_compute_the_u8_build_exactly(tiny_model: Path, tmp_path: Path) -> None:
    encoder = TextEncoder(tiny_model / "tokenizer.json", 48, 16)
    u8 = tmp_path / "u8.onnx"
    quantize_int8(export_fp32(tiny_model.parent / "checkpoint", tmp_path / "fp32"), u8, "u8")
    # 7-bit weights once shifted (u8 65..191): no CPU's 16-bit pair sums can saturate, so every CPU runs the
    # s8 form exactly, as VNNI and AMX CPUs run any s8 weights
    model = onnx.load(str(u8))
    weights = {node.input[1] for node in model.graph.node if node.op_type in WEIGHT_INPUTS}
    assert weights
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(np.clip(numpy_helper.to_array(init), 65, 191), init.name))
    onnx.save(model, str(u8))
    s8 = s8_weights(u8, sha256_of(u8))
    kinds = {init.data_type for init in onnx.load_from_string(s8).graph.initializer if init.name in weights}
    assert kinds == {onnx.TensorProto.INT8}
    feeds = _feeds(encoder, BATCH)
    np.testing.assert_array_equal(_logits(s8, feeds), _logits(u8, feeds))


def test_the_vnni_variant_is_model_onnx_with_s8_weights(tiny_model: Path) -> None:
    vnni = load_artifact(tiny_model, variant="vnni", flags={"avx512_vnni"})
    portable = load_artifact(tiny_model, flags={"avx2"})
    assert vnni.model_path == portable.model_path == tiny_model / MODEL_FILE
    assert isinstance(vnni.model_source(), bytes) and portable.model_source() == str(tiny_model / MODEL_FILE)
    if cpu_flags().intersection(VNNI_FLAGS):  # elsewhere s8 products may saturate: the variant rule's reason
        feeds = _feeds(TextEncoder(tiny_model / "tokenizer.json", 48, 16), BATCH)
        np.testing.assert_array_equal(_logits(vnni.model_source(), feeds), _logits(tiny_model / MODEL_FILE, feeds))


def test_a_session_built_from_bytes_keeps_no_reference_to_them(tiny_model: Path) -> None:
    """The vnni variant's bytes (34 MB for the student) are freed once its sessions are built."""
    model = (tiny_model / MODEL_FILE).read_bytes()
    references = sys.getrefcount(model)
    session = cpu_session(model)
    assert sys.getrefcount(model) == references  # ONNX Runtime's wrapper alone would hold one more
    del model
    feeds = _feeds(TextEncoder(tiny_model / "tokenizer.json", 48, 16), BATCH)
    np.testing.assert_array_equal(session.run(None, feeds)[0], _logits(tiny_model / MODEL_FILE, feeds))


def test_smoothing_changes_nothing_in_fp32(tiny_model: Path, tmp_path: Path) -> None:
    fp32 = export_fp32(tiny_model.parent / "checkpoint", tmp_path / "fp32")
    encoder = TextEncoder(tiny_model / "tokenizer.json", 48, 16)
    texts = ["The parcel came late and support never answered.", "Lovely!", "ok I guess, price was fine"]
    feeds = [_feeds(encoder, [text]) for text in texts]
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

"""Quantization-aware fine-tuning (distill/qat.py) on the tiny pipeline model: its rounding is the export's,
it moves the int8 copy towards the fp32 reference, and the export gates the copy against that reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from distill.data import load_all, sample
from distill.qat import input_ranges, make_fake_int8, module_name
from export.gate import onnx_logits
from export.onnx import export_fp32, quantize_int8
from export.static import HEADROOM, fix_activation_ranges
from service.artifact import load_artifact
from service.tokenization import TextEncoder
from tests.conftest import run_module

SOURCES = ("tweets", "rotten_tomatoes")


def tiny_checkpoint(tiny_model: Path) -> Path:
    return tiny_model.parent / "checkpoint"


def test_module_names_follow_the_exported_matmul_names() -> None:
    assert module_name("/bert/encoder/layer.2/intermediate/dense/MatMul") == "bert.encoder.layer.2.intermediate.dense"
    assert module_name("/classifier/MatMul") == "classifier"


def test_the_fake_int8_copy_computes_what_the_static_int8_export_computes(tiny_model, tmp_path) -> None:
    checkpoint = tiny_checkpoint(tiny_model)
    config = json.loads((checkpoint / "training_report.json").read_text())["config"]
    encoder = TextEncoder(checkpoint / "tokenizer.json", config["max_tokens"], config["head_tokens"])
    examples = load_all(SOURCES)
    calibration = encoder.encode([ex.text for ex in sample(examples, "train", 32)])
    texts = [ex.text for ex in sample(examples, "dev", 60)]
    fp32_path = export_fp32(checkpoint, tmp_path / "fp32")
    quantize_int8(fp32_path, tmp_path / "dynamic.onnx", "u8")
    fix_activation_ranges(tmp_path / "dynamic.onnx", tmp_path / "static.onnx",
                          [encoder.feeds([enc.ids], {"token_type_ids"}) for enc in calibration])
    fp32, int8 = onnx_logits(fp32_path, encoder, texts), onnx_logits(tmp_path / "static.onnx", encoder, texts)

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    alone = [{"input_ids": torch.tensor([enc.ids]), "attention_mask": torch.ones(1, len(enc.ids), dtype=torch.long)}
             for enc in calibration]
    fake = make_fake_int8(model, input_ranges(model, linears, alone, HEADROOM))
    with torch.no_grad():
        fake_logits = np.stack([fake(input_ids=torch.tensor([enc.ids])).logits[0].numpy()
                                for enc in encoder.encode(texts)])
    int8_error = float(((int8 - fp32) ** 2).mean())
    assert int8_error > 0  # the export's rounding does move the logits ...
    assert float(((fake_logits - int8) ** 2).mean()) < 0.5 * int8_error  # ... and the copy rounds alike


def test_qat_moves_int8_towards_fp32_and_the_export_gates_against_the_reference(tiny_model, tmp_path) -> None:
    checkpoint = tiny_checkpoint(tiny_model)
    run_module("distill", "qat", "--reference", str(checkpoint), "--sources", *SOURCES, "--per-source", "200",
               "--dev-per-source", "150", "--steps", "60", "--out", str(tmp_path / "qat"))
    report = json.loads((tmp_path / "qat" / "training_report.json").read_text())
    qat = report["quantization_aware"]
    assert qat["steps"] == 60 and qat["fake_int8_linears"] == 8 and qat["kept_fp32"] == []
    assert qat["held_out_after"]["logit_mse"] < qat["held_out_before"]["logit_mse"]
    assert report["config"]["max_tokens"] == 48  # the reference's training report travels with the copy

    run_module("export", "--checkpoint", str(tmp_path / "qat"), "--reference", str(checkpoint), "--out",
               str(tmp_path / "model"), "--sources", *SOURCES, "--eval-per-source", "80", "--min-agreement", "0.95",
               "--max-accuracy-drop", "0.05", "--mixed", "1")
    manifest = load_artifact(tmp_path / "model").manifest
    assert manifest.provenance["reference"] == str(checkpoint)
    assert manifest.provenance["training"]["quantization_aware"]["held_out_after"] == qat["held_out_after"]
    assert manifest.evaluation["gate"]["passed"]


def test_qat_refuses_a_matmul_the_model_does_not_have(tiny_model, tmp_path) -> None:
    node = "/bert/encoder/layer.7/output/dense/MatMul"  # the tiny model has one layer
    result = run_module("distill", "qat", "--reference", str(tiny_checkpoint(tiny_model)), "--sources", *SOURCES,
                        "--per-source", "20", "--steps", "1", "--keep-fp32", node, "--out", str(tmp_path / "qat"),
                        check=False)
    assert result.returncode == 2 and "layer.7" in result.stderr
    assert not (tmp_path / "qat").exists()

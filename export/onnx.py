"""Checkpoint -> fp32 ONNX (optimum) -> dynamic int8 (ONNX Runtime's quantizer)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from service.artifact import TOKENIZER_FILE


def export_fp32(checkpoint: Path, out_dir: Path) -> Path:
    """optimum's ONNX export of a sequence-classification checkpoint; returns the model path."""
    from optimum.exporters.onnx import main_export

    if not (checkpoint / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint / TOKENIZER_FILE}: the checkpoint has no tokenizer")
    out_dir.mkdir(parents=True, exist_ok=True)
    main_export(str(checkpoint), output=out_dir, task="text-classification", do_validation=False,
                local_files_only=True)
    return out_dir / "model.onnx"


def weight_matmuls(model_path: Path) -> list[str]:
    """MatMul nodes with a constant weight: the ones dynamic int8 quantizes."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_int8(fp32_path: Path, out_path: Path, weights: str, per_channel: bool = True,
                  exclude: list[str] | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """Dynamic int8 (ONNX Runtime's quantizer) of every MatMul with constant weights and of the embedding
    Gathers; `weights` 'u8' runs exactly on every CPU, 's8' needs VNNI or AMX (service/artifact.py).
    `exclude` keeps those nodes fp32; `only` quantizes just those (the export's sensitivity ranking).
    Returns the config recorded in the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    operators = ["MatMul", "Gather"]
    quantize_dynamic(str(fp32_path), str(out_path), op_types_to_quantize=operators, per_channel=per_channel,
                     weight_type={"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[weights],
                     nodes_to_quantize=only, nodes_to_exclude=exclude or [], extra_options={"MatMulConstBOnly": True})
    return {"mode": "dynamic-int8", "weights": weights, "activations": "u8", "per_channel": per_channel,
            "operators": operators, "fp32_nodes": sorted(exclude or [])}


def copy_tokenizer(checkpoint: Path, out_dir: Path) -> None:
    shutil.copy(checkpoint / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)

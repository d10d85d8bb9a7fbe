"""Checkpoint -> fp32 ONNX (optimum) -> dynamic int8 (config chosen from the CPU's flags)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from service.artifact import TOKENIZER_FILE


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def quantization_target(flags: set[str] | None = None) -> str:
    """avx512_vnni (s8 weights) where the CPU has VNNI, else avx2 (u8 weights); arm64 on ARM."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def export_fp32(checkpoint: Path, out_dir: Path) -> Path:
    """optimum's ONNX export of a sequence-classification checkpoint; returns the model path."""
    from optimum.exporters.onnx import main_export

    if not (checkpoint / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint / TOKENIZER_FILE}: the checkpoint has no tokenizer")
    out_dir.mkdir(parents=True, exist_ok=True)
    main_export(str(checkpoint), output=out_dir, task="text-classification", do_validation=False,
                local_files_only=True)
    return out_dir / "model.onnx"


def ffn_output_nodes(model_path: Path) -> list[str]:
    """The feed-forward output projections (`…/output/dense/MatMul`, not attention's): BERT's activation
    outliers live there, and keeping them in fp32 is what lifts int8/fp32 agreement most (README)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.name.endswith("/output/dense/MatMul") and "/attention/" not in n.name]


def quantize_int8(fp32_dir: Path, out_dir: Path, target: str, per_channel: bool,
                  exclude: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Dynamic int8 with optimum's per-ISA config; returns the model path and the config recorded."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    config = getattr(AutoQuantizationConfig, target)(is_static=False, per_channel=per_channel,
                                                      nodes_to_exclude=exclude or [])
    quantizer = ORTQuantizer.from_pretrained(fp32_dir, file_name="model.onnx")
    out_dir.mkdir(parents=True, exist_ok=True)
    quantizer.quantize(save_dir=out_dir, quantization_config=config)
    quantized = out_dir / "model_quantized.onnx"
    record = {"mode": "dynamic-int8", "target": target, "per_channel": per_channel,
              "weights": str(config.weights_dtype.name), "activations": str(config.activations_dtype.name),
              "operators": sorted(config.operators_to_quantize), "fp32_nodes": sorted(exclude or [])}
    return quantized, record


def copy_tokenizer(checkpoint: Path, out_dir: Path) -> None:
    shutil.copy(checkpoint / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)

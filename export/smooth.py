"""Activation smoothing before dynamic int8 (the SmoothQuant idea), so every MatMul can run in int8.

Dynamic int8 gives each activation tensor one scale per call. In BERT a few hidden channels carry values
tens of times larger than the rest, so that scale is set by the outliers and the other channels keep
only a few levels: that is where int8 loses agreement with fp32, and why the old artefact kept the FFN
output projections in fp32 (at half the speed). Here each input channel j of a MatMul's activation is
divided by s_j and the matching weight row multiplied by s_j, which changes nothing in fp32:
    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)
max|X_j| is measured on calibration texts. One Mul per activation tensor is inserted (Q, K and V share
theirs); the weights absorb the rest, and per-channel weight quantization handles them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


def smooth_model(fp32_path: Path, out_path: Path, calibration: Sequence[dict[str, np.ndarray]],
                 alpha: float) -> dict[str, object]:
    """Write a smoothed copy of `fp32_path` (same outputs up to float rounding); returns what was done."""
    model = onnx.load(str(fp32_path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in weights:
            consumers[node.input[0]].append(node)
    activations = sorted(consumers)
    peak = _activation_peaks(fp32_path, activations, calibration)
    for tensor in activations:
        nodes = consumers[tensor]
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        weight_peak = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
        scale = np.clip(peak[tensor], 1e-5, None) ** alpha / np.clip(weight_peak, 1e-5, None) ** (1 - alpha)
        scale = (scale / np.exp(np.log(scale).mean())).astype(np.float32)  # geometric mean 1: no drift in size
        for node, array in zip(nodes, arrays, strict=True):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(array * scale[:, None], node.input[1]))
        name = f"{tensor}_smooth"
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), f"{name}_inverse"))
        mul = helper.make_node("Mul", [tensor, f"{name}_inverse"], [name], name=f"{name}_Mul")
        first = min(list(graph.node).index(n) for n in nodes)
        graph.node.insert(first, mul)
        for node in nodes:
            node.input[0] = name
    onnx.save(model, str(out_path))
    return {"method": "smoothquant", "alpha": alpha, "activations": len(activations),
            "calibration_texts": len(calibration)}


def _activation_peaks(fp32_path: Path, tensors: list[str],
                      calibration: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each tensor over the calibration inputs (one unpadded text per call)."""
    probe = onnx.load(str(fp32_path))
    known = {out.name for out in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    peak: dict[str, np.ndarray] = {}
    for feeds in calibration:
        for tensor, value in zip(tensors, session.run(tensors, feeds), strict=True):
            channel_peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            peak[tensor] = np.maximum(peak[tensor], channel_peak) if tensor in peak else channel_peak
    return peak

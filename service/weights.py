"""An int8 build's MatMul weights re-encoded as s8 at load time, for CPUs with VNNI or AMX.

A u8 weight q with zero point z stands for scale * (q - z); the same weight as s8 is q - 128 with zero
point z - 128, so every real weight, and every integer product, is unchanged. ONNX Runtime multiplies u8
activations by s8 weights with VNNI (AVX-512-VNNI, AVX-VNNI) or AMX 1.3-1.4x faster than by u8 weights,
exactly (32-bit sums); on a CPU with AVX2 alone the s8 product goes through 16-bit sums that can
saturate, so only the first kind of CPU gets it (service/artifact.py). Measured on a Zen 4 against the
u8 file: the same logits to the last bit on 3,103 test texts (README, Model variants), and the aspect
encoder's embeddings to the last bit on the 702 dev and held-out clauses. Deriving it here instead of
shipping a second file keeps one artefact of ~34 MB, and the same answers on every CPU.
"""

from __future__ import annotations

import functools
from pathlib import Path

# The CPU flags (any one) with which ONNX Runtime multiplies u8 activations by s8 weights exactly, and fastest.
S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# How manifests name u8 weights: the export's quantize_int8 ("u8") and optimum's configs ("QUInt8").
U8_WEIGHTS = ("u8", "QUInt8")
# The inputs of ONNX Runtime's integer MatMuls that hold a weight and its zero point.
WEIGHT_INPUTS = {"MatMulInteger": (1, 3), "MatMulIntegerToFloat": (1, 5)}


@functools.lru_cache(maxsize=1)  # every stream's session, the lone session and the layout calibration share it
def s8_weights(model_path: Path, sha256: str) -> bytes:
    """The student's s8 form (see shifted_to_s8), cached by the file's hash `sha256`."""
    return shifted_to_s8(model_path)


def shifted_to_s8(model_path: Path) -> bytes:
    """The model at `model_path` with its u8 MatMul weights and their zero points shifted to s8, serialised
    for ort.InferenceSession."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    names = {node.input[i] for node in model.graph.node for i in WEIGHT_INPUTS.get(node.op_type, ())
             if i < len(node.input) and node.input[i]}
    for init in model.graph.initializer:
        if init.name in names and init.data_type == onnx.TensorProto.UINT8:
            shifted = numpy_helper.to_array(init).astype(np.int16) - 128
            init.CopyFrom(numpy_helper.from_array(shifted.astype(np.int8), init.name))
    return model.SerializeToString()

"""The committed model on CPUs with fewer instructions than this one (emulated by qemu-user, so ONNX Runtime
takes their kernels): the build that needs no CPU flag gives this CPU's labels on an AVX2-only and on an
SSE4.2-only CPU."""

from __future__ import annotations

import re
import shutil

import pytest

from service.settings import DEFAULT_MODEL_DIR
from tests.conftest import run_module

pytestmark = pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                                reason="qemu-x86_64 not installed (apt-get install qemu-user; .ci/run installs it)")


def test_the_portable_build_gives_the_same_labels_on_avx2_and_sse_cpus() -> None:
    out = run_module("bench.emulated", "--model", str(DEFAULT_MODEL_DIR), "--texts", "messages",
                     "--cpus", "Haswell", "Nehalem", timeout=1200).stdout
    same_label = {(m[1], m[2]): float(m[3])
                  for m in re.finditer(r"^(\S+)\s+(\S+)\s+.+?\s([\d.]+)%\s+[\d.]+\s+[\d.]+$", out, re.M)}
    assert {(cpu, build) for cpu in ("Haswell", "Nehalem") for build in ("vnni", "portable")} == set(same_label), out
    # u8 x u8 products sum exactly in int32 on every kernel; the float parts (layer norm, GELU, softmax)
    # differ between kernels by rounding, which moves logits slightly but no label of these messages.
    assert same_label[("Haswell", "portable")] == same_label[("Nehalem", "portable")] == 100.0, out

"""The model's int8 builds on CPUs with fewer instructions than this one, emulated: each variant's logits
on an emulated CPU (qemu-user's `-cpu` models: Haswell = AVX2 and FMA without AVX-512 or VNNI, Nehalem =
SSE4.2) against the same variant on this CPU. ONNX Runtime picks its kernels from CPUID, which the
emulator answers, so an emulated run takes the code path a real CPU of that kind takes. Correctness only:
emulated time says nothing about speed.

  python bench/emulated.py [--cpus Haswell Nehalem] [--texts dev|messages] [--per-source 50]

Needs `qemu-x86_64` (Debian: qemu-user). Prints one row per emulated CPU and variant; exits 1 if the
variant that needs no CPU flag gives any label other than this CPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export.gate import onnx_logits
from service.artifact import MANIFEST_FILE, Variant, load_artifact, variants_of
from service.settings import DEFAULT_MODEL_DIR
from service.tokenization import TextEncoder

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-x86_64")


def variants(model_dir: Path) -> list[Variant]:
    return variants_of(load_artifact(model_dir, verify_hash=False).manifest, model_dir / MANIFEST_FILE)


def variant_logits(model_dir: Path, name: str, texts: list[str]) -> np.ndarray:
    """Logits of every text in order, in batches of 16 of similar length."""
    every_flag = {flag for variant in variants(model_dir) for flag in variant.requires_any}
    # Pinned whatever this CPU's flags: the point is to see what a build does where it would not be chosen.
    artifact = load_artifact(model_dir, False, name, flags=every_flag)
    manifest = artifact.manifest
    encoder = TextEncoder(artifact.tokenizer_path, manifest.max_tokens, manifest.head_tokens)
    return onnx_logits(artifact.model_source(), encoder, texts, batch_size=16)


def emulated_logits(cpu: str, model_dir: Path, name: str, texts_file: Path, work: Path) -> np.ndarray:
    """The same computation in a child process on qemu's `cpu` model. The child is the real interpreter
    (qemu reports the resolved binary as the executable, which would lose the virtual environment), with
    this environment's packages on its path."""
    out = work / f"{cpu}-{name}.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], str(ROOT)])}
    command = [QEMU or "qemu-x86_64", "-cpu", cpu, os.path.realpath(sys.executable), str(Path(__file__).resolve()),
               "--child", name, "--model", str(model_dir), "--texts-file", str(texts_file), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"{cpu}/{name}: the emulated run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return np.load(out)


def load_texts(kind: str, per_source: int) -> list[str]:
    if kind == "messages":
        from bench.serving import MESSAGES

        return list(MESSAGES)
    from distill.data import load_all, sample

    return [ex.text for ex in sample(load_all(), "dev", per_source)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--cpus", nargs="+", default=["Haswell", "Nehalem"], help="qemu -cpu models")
    parser.add_argument("--texts", choices=["dev", "messages"], default="dev",
                        help="dev: the held-out dev split (needs the data wheels); messages: the servers' messages")
    parser.add_argument("--per-source", type=int, default=50,
                        help="dev texts per source (emulation is slow: 50 took 13 minutes per build on Haswell)")
    parser.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        np.save(args.out, variant_logits(args.model, args.child, json.loads(args.texts_file.read_text())))
        return 0
    if QEMU is None:
        print("qemu-x86_64 not found: apt-get install qemu-user", file=sys.stderr)
        return 2

    texts = load_texts(args.texts, args.per_source)
    manifest = load_artifact(args.model, verify_hash=False).manifest
    print(f"{manifest.name} {manifest.version}, {len(texts)} texts ({args.texts}); "
          f"each emulated CPU against this one's run of the same variant")
    print(f"{'cpu':10s} {'variant':10s} {'needs':28s} {'same label':>11s} {'max |dlogit|':>13s} {'mean |dlogit|':>14s}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts_file = work / "texts.json"
        texts_file.write_text(json.dumps(texts))
        for variant in variants(args.model):
            native = variant_logits(args.model, variant.name, texts)
            for cpu in args.cpus:
                emulated = emulated_logits(cpu, args.model, variant.name, texts_file, work)
                same = float((native.argmax(axis=1) == emulated.argmax(axis=1)).mean())
                diff = np.abs(native - emulated)
                needs = ", ".join(variant.requires_any) or "nothing"
                print(f"{cpu:10s} {variant.name:10s} {needs:28s} {same:11.2%} {diff.max():13.4f} {diff.mean():14.5f}")
                failed |= not variant.requires_any and same < 1.0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

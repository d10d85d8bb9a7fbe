"""The model artefact contract: one directory with model.onnx, tokenizer.json and manifest.json, and
optionally more int8 builds of the same model (variants) for CPUs with faster integer instructions.

The export step writes it through `write_manifest`, the service reads it through `load_artifact`;
both use the definitions here, so the two sides cannot drift. Standard library only.

Why variants: ONNX Runtime multiplies u8 activations by s8 weights fastest with VNNI or AMX (exact int32
sums), while on a CPU with AVX2 alone that product goes through 16-bit sums that can saturate. u8 weights
are exact everywhere but run at half the speed on VNNI CPUs. So an artefact may carry an s8 build that
requires one of those flags beside the portable u8 `model.onnx`, and the loader picks at run time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = 1


class ArtifactError(Exception):
    """The artefact directory is unusable; the message names the file and the problem in one line."""


@dataclass(frozen=True)
class Manifest:
    """What a model directory declares about itself (labels in output order, limits, provenance)."""

    name: str
    version: str
    labels: tuple[str, ...]
    max_tokens: int
    sha256: str
    temperature: float = 1.0
    # Tokens kept from the start of a text that is too long; the rest of the budget goes to its end.
    head_tokens: int | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    # Builds in order of preference; the last is model.onnx, which any CPU runs (see Variant).
    variants: tuple[dict[str, Any], ...] = ()
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["variants"] = list(self.variants)
        return data


def runs_exactly(requires_any: tuple[str, ...], flags: set[str]) -> bool:
    """A build needing any one of `requires_any` (none: every CPU) gives its own answers on a CPU with `flags`."""
    return not requires_any or bool(flags.intersection(requires_any))


@dataclass(frozen=True)
class Variant:
    """One int8 build of the model: its file, hash, and the CPU flags it needs (any one of them; none:
    it runs, and gives the same answers, on every CPU)."""

    name: str
    file: str
    sha256: str
    requires_any: tuple[str, ...] = ()
    quantization: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    # "s8": the file's u8 MatMul weights are loaded as s8 (service/weights.py); "": as stored.
    load_weights_as: str = ""

    def runs_on(self, flags: set[str]) -> bool:
        return runs_exactly(self.requires_any, flags)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "requires_any": list(self.requires_any)}


@dataclass(frozen=True)
class Artifact:
    directory: Path
    manifest: Manifest
    variant: Variant
    reason: str = ""  # why this variant (logged, and shown by GET /v1/model)

    @property
    def model_path(self) -> Path:
        return self.directory / self.variant.file

    def model_source(self) -> str | bytes:
        """What ort.InferenceSession loads for this variant: the file's path, or its bytes re-encoded."""
        if self.variant.load_weights_as == "s8":
            from service.weights import s8_weights

            return s8_weights(self.model_path, self.variant.sha256)
        return str(self.model_path)

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER_FILE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # the ones that decide int8 speed


def cpu_model() -> str:
    """The CPU's model name and its INT8_FLAGS ("AMD EPYC, avx2 avx512f avx512_vnni"): what a measured
    latency is worth only beside."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    flags = cpu_flags()
    return f"{name}, {' '.join(flag for flag in INT8_FLAGS if flag in flags) or 'no AVX2'}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (avx2, avx512_vnni, avx_vnni, amx_int8 …); empty
    where /proc/cpuinfo cannot be read, which leaves only variants that need no flag."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def _parse_manifest(path: Path) -> Manifest:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    missing = [key for key in ("name", "version", "labels", "max_tokens", "sha256") if key not in raw]
    if missing:
        raise ArtifactError(f"{path}: missing field(s) {', '.join(missing)}")
    if raw.get("schema", MANIFEST_SCHEMA) != MANIFEST_SCHEMA:
        raise ArtifactError(f"{path}: manifest schema {raw.get('schema')} is not {MANIFEST_SCHEMA}")
    labels = tuple(raw["labels"]) if isinstance(raw["labels"], list) else ()
    if sorted(labels) != sorted(LABELS):
        raise ArtifactError(f"{path}: unknown label set {raw['labels']!r}, expected {list(LABELS)}")
    max_tokens, temperature = raw["max_tokens"], raw.get("temperature", 1.0)
    if not isinstance(max_tokens, int) or max_tokens < 8:
        raise ArtifactError(f"{path}: max_tokens must be an integer >= 8, got {max_tokens!r}")
    if not isinstance(temperature, int | float) or temperature <= 0:
        raise ArtifactError(f"{path}: temperature must be a positive number, got {temperature!r}")
    head = raw.get("head_tokens")
    if head is not None and (not isinstance(head, int) or not 0 < head < max_tokens - 2):
        raise ArtifactError(f"{path}: head_tokens must be an integer in 1..max_tokens-3, got {head!r}")
    variants = raw.get("variants", [])
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ArtifactError(f"{path}: variants must be a list of objects")
    known = set(Manifest.__dataclass_fields__)
    fields = {key: value for key, value in raw.items() if key in known}
    fields.update(labels=labels, temperature=float(temperature), variants=tuple(variants))
    return Manifest(**fields)


def variants_of(manifest: Manifest, path: Path) -> list[Variant]:
    """The manifest's builds; an artefact without a variants list has one, model.onnx, for any CPU."""
    if not manifest.variants:
        return [Variant("portable", MODEL_FILE, manifest.sha256, (), manifest.quantization)]
    out = []
    for index, raw in enumerate(manifest.variants):
        try:
            variant = Variant(name=raw["name"], file=raw["file"], sha256=raw["sha256"],
                              requires_any=tuple(raw.get("requires_any", ())),
                              quantization=raw.get("quantization", {}), evaluation=raw.get("evaluation", {}),
                              load_weights_as=raw.get("load_weights_as", ""))
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}: variants[{index}] is missing or has a bad field ({exc})") from None
        if Path(variant.file).name != variant.file:
            raise ArtifactError(f"{path}: variants[{index}].file must be a file name in the model directory")
        if variant.load_weights_as not in ("", "s8"):
            raise ArtifactError(f"{path}: variants[{index}].load_weights_as must be \"s8\" or absent, "
                                f"got {variant.load_weights_as!r}")
        out.append(variant)
    if out[-1].requires_any:
        raise ArtifactError(f"{path}: the last variant must need no CPU flag, so that every CPU has one")
    return out


def choose_variant(variants: list[Variant], wanted: str, flags: set[str]) -> tuple[Variant, str]:
    """`auto`: the first variant this CPU runs exactly (the manifest lists the fastest first); a name: that
    one, refused where the CPU lacks the flags it needs (its int8 products would saturate)."""
    if wanted == "auto":
        variant = next(v for v in variants if v.runs_on(flags))
        skipped = variants[:variants.index(variant)]
        reason = (f"{variant.name}: " + (f"this CPU has {', '.join(sorted(flags.intersection(variant.requires_any)))}"
                                          if variant.requires_any else "runs on any CPU"))
        if skipped:
            reason += "; " + "; ".join(f"not {v.name}: needs one of {', '.join(v.requires_any)}" for v in skipped)
        return variant, reason
    for variant in variants:
        if variant.name == wanted:
            if not variant.runs_on(flags):
                raise ArtifactError(f"model variant {wanted!r} needs one of the CPU flags "
                                    f"{', '.join(variant.requires_any)}; this CPU has none of them")
            return variant, f"{variant.name}: set by SENTIMENT_MODEL_VARIANT"
    raise ArtifactError(f"model variant {wanted!r} is not in this artefact "
                        f"(it has {', '.join(v.name for v in variants)})")


def load_artifact(directory: Path | str, verify_hash: bool = True, variant: str = "auto",
                  flags: set[str] | None = None) -> Artifact:
    """Load a model directory, choose the build for this CPU and verify its hash; any problem raises
    ArtifactError naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: model directory not found (set SENTIMENT_MODEL_DIR or run make model)")
    for name in (MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory / name}: required file is missing")
    manifest = _parse_manifest(directory / MANIFEST_FILE)
    chosen, reason = choose_variant(variants_of(manifest, directory / MANIFEST_FILE), variant,
                                    cpu_flags() if flags is None else flags)
    path = directory / chosen.file
    if not path.is_file():
        raise ArtifactError(f"{path}: required file is missing (variant {chosen.name})")
    if verify_hash:
        actual = sha256_of(path)
        if actual != chosen.sha256:
            raise ArtifactError(f"{path}: sha256 {actual[:12]}… does not match the manifest's {chosen.sha256[:12]}…")
    return Artifact(directory=directory, manifest=manifest, variant=chosen, reason=reason)

"""The model artefact contract: one directory with model.onnx, tokenizer.json and manifest.json.

The export step writes it through `write_manifest`, the service reads it through `load_artifact`;
both use the definitions here, so the two sides cannot drift. Standard library only.
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
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data


@dataclass(frozen=True)
class Artifact:
    directory: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER_FILE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    known = set(Manifest.__dataclass_fields__)
    fields = {key: value for key, value in raw.items() if key in known}
    fields.update(labels=labels, temperature=float(temperature))
    return Manifest(**fields)


def load_artifact(directory: Path | str, verify_hash: bool = True) -> Artifact:
    """Load and verify a model directory; any problem raises ArtifactError naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: model directory not found (set SENTIMENT_MODEL_DIR or run make model)")
    for name in (MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory / name}: required file is missing")
    manifest = _parse_manifest(directory / MANIFEST_FILE)
    if verify_hash:
        actual = sha256_of(directory / MODEL_FILE)
        if actual != manifest.sha256:
            raise ArtifactError(
                f"{directory / MODEL_FILE}: sha256 {actual[:12]}… does not match the manifest's "
                f"{manifest.sha256[:12]}…"
            )
    return Artifact(directory=directory, manifest=manifest)

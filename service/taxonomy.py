"""Aspect taxonomies: the parts of the experience a deployment wants opinions sorted into.

A taxonomy is a TOML file of aspect names, descriptions and optional example phrases. The aspect
method compares clauses with these phrases (service/aspects.py), so replacing the file changes the
aspects with no retraining. Every problem is refused at start-up with the file and the field named.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TAXONOMY = Path(__file__).resolve().parent / "taxonomies" / "customer-service.toml"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # also a Prometheus label value: short and plain
MAX_ASPECTS, MAX_EXAMPLES, MAX_PHRASE_CHARS = 32, 64, 200


class TaxonomyError(ValueError):
    """The taxonomy file is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class Aspect:
    name: str
    description: str
    examples: tuple[str, ...] = ()

    def phrases(self) -> list[str]:
        """What a clause is compared with: the name, each term of the description, each example."""
        terms = [term.strip() for term in re.split(r"[,;:]", self.description)]
        return list(dict.fromkeys([self.name.replace("_", " "), *filter(None, terms), *self.examples]))


@dataclass(frozen=True)
class Taxonomy:
    version: str
    aspects: tuple[Aspect, ...]
    threshold: float | None = None  # None: the sentence encoder's own (its manifest)
    no_aspect_examples: tuple[str, ...] = ()  # extra phrases that name no aspect (greetings, thanks)

    @property
    def names(self) -> list[str]:
        return [aspect.name for aspect in self.aspects]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "threshold": self.threshold,
                "aspects": [{"name": a.name, "description": a.description} for a in self.aspects]}


def load_taxonomy(path: Path | str) -> Taxonomy:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaxonomyError(f"{path}: taxonomy file not found (SENTIMENT_ASPECT_TAXONOMY)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaxonomyError(f"{path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TaxonomyError(f"{path}: not valid TOML ({exc})") from None
    where = str(path)
    _only_keys(raw, {"version", "threshold", "aspects", "no_aspect_examples"}, where)
    version = raw.get("version", path.stem)
    if not isinstance(version, str) or not version.strip():
        raise TaxonomyError(f"{where}: version: must be a non-empty string")
    threshold = raw.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not 0 < threshold < 1):
        raise TaxonomyError(f"{where}: threshold: must be a number between 0 and 1, got {threshold!r}")
    entries = raw.get("aspects")
    if not isinstance(entries, list) or not entries:
        raise TaxonomyError(f"{where}: aspects: give at least one [[aspects]] table with a name and a description")
    if len(entries) > MAX_ASPECTS:
        raise TaxonomyError(f"{where}: aspects: at most {MAX_ASPECTS}, got {len(entries)}")
    aspects = [_aspect(entry, f"{where}: aspects[{i}]") for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for i, aspect in enumerate(aspects):
        if aspect.name in seen:
            raise TaxonomyError(f"{where}: aspects[{i}].name: {aspect.name!r} appears twice")
        seen.add(aspect.name)
    none = _phrases(raw.get("no_aspect_examples", []), f"{where}: no_aspect_examples")
    return Taxonomy(version.strip(), tuple(aspects), None if threshold is None else float(threshold), none)


def _aspect(entry: Any, where: str) -> Aspect:
    if not isinstance(entry, dict):
        raise TaxonomyError(f"{where}: must be a table with name, description and optional examples")
    _only_keys(entry, {"name", "description", "examples"}, where)
    name, description = entry.get("name"), entry.get("description")
    if not isinstance(name, str) or not NAME.match(name):
        raise TaxonomyError(f"{where}.name: must match {NAME.pattern} (lower case, digits, underscore; "
                            f"at most 32 characters), got {name!r}")
    if not isinstance(description, str) or not description.strip():
        raise TaxonomyError(f"{where}.description: must be a non-empty string (what the aspect covers)")
    if len(description) > 4 * MAX_PHRASE_CHARS:
        raise TaxonomyError(f"{where}.description: longer than {4 * MAX_PHRASE_CHARS} characters")
    return Aspect(name, " ".join(description.split()), _phrases(entry.get("examples", []), f"{where}.examples"))


def _phrases(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise TaxonomyError(f"{where}: must be a list of non-empty strings")
    if len(value) > MAX_EXAMPLES:
        raise TaxonomyError(f"{where}: at most {MAX_EXAMPLES} phrases, got {len(value)}")
    if any(len(item) > MAX_PHRASE_CHARS for item in value):
        raise TaxonomyError(f"{where}: each phrase at most {MAX_PHRASE_CHARS} characters")
    return tuple(" ".join(item.split()) for item in value)


def _only_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TaxonomyError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")

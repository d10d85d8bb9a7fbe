"""Quantization-aware fine-tuning: teach a copy of the trained student to give the fp32 student's answers
after the int8 export has rounded it.

Post-training int8 (export/) moves the labels of texts the fp32 model nearly ties: 0.7% of test labels
on model 2.2.0, and keeping more MatMuls in fp32 does not close the gap. Here a copy of the student runs
with every weight the export quantizes rounded as the export rounds it (per-output-channel u8 for the
MatMuls, per-column u8 for the embedding tables) and every quantized MatMul's input rounded to u8 over
the range it took on calibration texts (as export/static.py fixes it, headroom included). Rounding passes
gradients through unchanged (straight-through), and the copy is fine-tuned to reproduce the fp32
student's logits on train texts. `python -m export --checkpoint <this> --reference <the student>` then
quantizes the copy and gates it against the student it stands in for.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification

from distill.train import TrainConfig, TrainItem, collate, length_grouped_batches, predict_logits, seed_everything
from export.gate import agreement
from export.static import HEADROOM
from service.artifact import TOKENIZER_FILE
from service.tokenization import TextEncoder

U8_MAX = 255.0


@dataclass
class QatConfig:
    steps: int = 300
    learning_rate: float = 1e-6  # Adam moves every weight ~lr a step; int8 steps are ~1e-4
    warmup_ratio: float = 0.1
    batch_tokens: int = 4096
    max_batch_size: int = 64
    headroom: float = HEADROOM  # the export's factor on every calibrated input range
    seed: int = 13
    threads: int = 2


def round_through(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_u8(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """x quantized to u8 over [low, high] (broadcast; 0 always inside, as ONNX Runtime's quantizer keeps it)
    and dequantized: the value an int8 kernel multiplies."""
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = torch.clamp((high - low) / U8_MAX, min=1e-12).detach()
    zero = torch.clamp(torch.round(-low / scale), 0, U8_MAX).detach()
    q = torch.clamp(round_through(x / scale) + zero, 0, U8_MAX)
    return (q - zero) * scale


def fake_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel u8 over each channel's own range (torch's [out, in] is ONNX's [in, out], axis 1)."""
    return fake_u8(weight, weight.min(dim=1, keepdim=True).values.detach(),
                   weight.max(dim=1, keepdim=True).values.detach())


class FakeInt8Linear(nn.Module):
    """A Linear as the static int8 export computes it: u8 input over a fixed range, u8 weights per channel."""

    def __init__(self, linear: nn.Linear, low: float, high: float) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("low", torch.tensor(low))
        self.register_buffer("high", torch.tensor(high))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_u8(x, self.low, self.high), fake_weight(self.linear.weight), self.linear.bias)


class FakeInt8Embedding(nn.Module):
    """An embedding table quantized per column (hidden dimension), as the export's int8 Gather holds it
    (export.onnx.requantize_tables_per_column)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.embedding.weight
        return F.embedding(ids, fake_u8(table, table.min(dim=0, keepdim=True).values.detach(),
                                        table.max(dim=0, keepdim=True).values.detach()))


@torch.no_grad()
def input_ranges(model: nn.Module, names: Sequence[str], feeds: Sequence[dict[str, torch.Tensor]],
                 headroom: float) -> dict[str, tuple[float, float]]:
    """(min, max) × headroom of each named Linear's input over `feeds`, each text run alone (no padding)."""
    low = dict.fromkeys(names, 0.0)
    high = dict.fromkeys(names, 0.0)
    modules = dict(model.named_modules())

    def watch(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            low[name] = min(low[name], float(args[0].min()))
            high[name] = max(high[name], float(args[0].max()))
        return hook

    handles = [modules[name].register_forward_pre_hook(watch(name)) for name in names]
    try:
        model.eval()
        for feed in feeds:
            model(**feed)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (headroom * low[name], headroom * high[name]) for name in names}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def make_fake_int8(model: nn.Module, ranges: dict[str, tuple[float, float]]) -> nn.Module:
    """A copy of `model` with each Linear in `ranges` and every embedding table rounded as int8."""
    fake = copy.deepcopy(model)
    for name, (low, high) in ranges.items():
        _replace(fake, name, FakeInt8Linear(fake.get_submodule(name), low, high))
    for name, module in list(fake.named_modules()):
        if isinstance(module, nn.Embedding):
            _replace(fake, name, FakeInt8Embedding(module))
    return fake


def module_name(onnx_node: str) -> str:
    """The torch module an exported MatMul came from: '/bert/encoder/layer.0/output/dense/MatMul' ->
    'bert.encoder.layer.0.output.dense' (how the export's manifest names the MatMuls it kept in fp32)."""
    return onnx_node.strip("/").removesuffix("/MatMul").replace("/", ".")


def plain_copy(fake: nn.Module) -> nn.Module:
    """The fine-tuned model without its rounding wrappers (they hold its parameters)."""
    plain = copy.deepcopy(fake)
    for name, module in list(plain.named_modules()):
        if isinstance(module, FakeInt8Linear):
            _replace(plain, name, module.linear)
        elif isinstance(module, FakeInt8Embedding):
            _replace(plain, name, module.embedding)
    return plain


def held_out_match(reference: nn.Module, fake: nn.Module, encoder: TextEncoder,
                   texts: Sequence[str]) -> dict[str, float]:
    """How closely the fake-int8 copy gives the reference's answers on held-out texts: label agreement
    and mean squared logit difference."""
    ours, theirs = predict_logits(fake, encoder, texts), predict_logits(reference, encoder, texts)
    return {"agreement": round(agreement(theirs, ours), 4), "logit_mse": round(float(((ours - theirs) ** 2).mean()), 6)}


def fine_tune(reference_dir: Path, out_dir: Path, items: Sequence[TrainItem], calibration: Sequence[list[int]],
              held_out: Sequence[str], encoder: TextEncoder, config: QatConfig,
              keep_fp32: Sequence[str] = ()) -> dict[str, Any]:
    """Fine-tune a fake-int8 copy of `reference_dir` towards its fp32 logits, the Linears named in
    `keep_fp32` (the MatMuls the export will keep in fp32) left unrounded; write the plain copy (weights
    only, loadable like any checkpoint) with the reference's tokenizer and a report, which gives the
    copy's match to the reference on `held_out` texts before and after."""
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    reference = AutoModelForSequenceClassification.from_pretrained(reference_dir).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    feeds = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
             for ids in calibration]
    linears = [name for name, module in reference.named_modules() if isinstance(module, nn.Linear)]
    unknown = set(keep_fp32) - set(linears)
    if unknown:
        raise ValueError(f"--keep-fp32: no such Linear in the model: {sorted(unknown)}")
    linears = [name for name in linears if name not in keep_fp32]
    ranges = input_ranges(reference, linears, feeds, config.headroom)
    student = make_fake_int8(reference, ranges)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    student.eval()  # no dropout: the copy must match the reference's deterministic outputs
    before = held_out_match(reference, student, encoder, held_out)
    print(f"qat: fake int8 against fp32 on {len(held_out)} held-out texts before: {before}", flush=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, int(config.steps * config.warmup_ratio))
    decay = max(1, config.steps - warmup)  # linear warm-up, then a cosine down to 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / decay)))))
    batching = TrainConfig(batch_tokens=config.batch_tokens, max_batch_size=config.max_batch_size)
    rng = random.Random(config.seed)
    started, step, running = time.perf_counter(), 0, 0.0
    while step < config.steps:
        for batch_items in length_grouped_batches(items, batching, rng):
            if step >= config.steps:
                break
            batch = collate(batch_items, encoder)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with torch.no_grad():
                target = reference(**inputs).logits
            loss = F.mse_loss(student(**inputs).logits, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running = 0.95 * running + 0.05 * loss.item() if step > 1 else loss.item()
            if step % 25 == 0 or step == config.steps:
                elapsed = time.perf_counter() - started
                print(f"qat step {step}/{config.steps} logit mse {running:.5f} "
                      f"eta {elapsed / step * (config.steps - step) / 60:.1f} min", flush=True)
    after = held_out_match(reference, student, encoder, held_out)
    print(f"qat: after: {after}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain_copy(student).save_pretrained(out_dir)
    shutil.copy(reference_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    training = reference_dir / "training_report.json"
    report = {
        "quantization_aware": {"reference": str(reference_dir), "config": asdict(config), "steps": step,
                               "examples": len(items), "calibration_texts": len(calibration),
                               "fake_int8_linears": len(ranges), "kept_fp32": sorted(keep_fp32),
                               "held_out_texts": len(held_out), "held_out_before": before, "held_out_after": after,
                               "seconds": round(time.perf_counter() - started, 1)},
        **(json.loads(training.read_text()) if training.exists() else {}),
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

"""Text to token ids, the same way in training, export and serving.

A text longer than the budget keeps its first `head_tokens` and its last tokens (head+tail
truncation: reviews state their verdict at the end) and is flagged as truncated.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool


class TextEncoder:
    def __init__(self, tokenizer_path: Path, max_tokens: int, head_tokens: int | None = None) -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads every text to 128 tokens: switch that off, we pad per batch.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_tokens = max_tokens
        budget = max_tokens - 2
        self._head = budget if head_tokens is None else min(head_tokens, budget)
        self._tail = budget - self._head
        self._cls = self._special_id("[CLS]", "<s>")
        self._sep = self._special_id("[SEP]", "</s>")
        self.pad_id = self._special_id("[PAD]", "<pad>")
        self.vocab_size = self._tokenizer.get_vocab_size()

    def _special_id(self, *names: str) -> int:
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"tokenizer has none of the special tokens {names}")

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        out = []
        budget = self.max_tokens - 2
        # The fast batch path skips character offsets, which nothing here uses: the same ids, one text 18.6
        # against 21.5 us with `encode`, 8 texts 184 against 206 us with `encode_batch` (medians, hot).
        for encoding in self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False):
            ids = encoding.ids
            truncated = len(ids) > budget
            if truncated:
                ids = ids[: self._head] + (ids[len(ids) - self._tail :] if self._tail else [])
            out.append(Encoded(ids=[self._cls, *ids, self._sep], truncated=truncated))
        return out

    def pad(self, sequences: Sequence[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest sequence: (input_ids, attention_mask), int64."""
        width = max(len(seq) for seq in sequences)
        input_ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return input_ids, mask

    def feeds(self, sequences: Sequence[list[int]], inputs: Collection[str]) -> dict[str, np.ndarray]:
        """ONNX Runtime feeds for `sequences`, padded; token_type_ids (zeros) only where the model's `inputs`
        name them (BERT exports take them, others do not)."""
        input_ids, mask = self.pad(sequences)
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return feeds

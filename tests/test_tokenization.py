"""Head+tail truncation and batch padding, with the real MiniLM tokenizer."""

from __future__ import annotations

from distill.data import backbone_dir
from service.tokenization import TextEncoder


def test_short_texts_are_untouched_and_framed_by_special_tokens() -> None:
    encoder = TextEncoder(backbone_dir() / "tokenizer.json", max_tokens=32, head_tokens=8)
    (encoded,) = encoder.encode(["I love it"])
    assert not encoded.truncated
    assert encoded.ids[0] == 101 and encoded.ids[-1] == 102 and len(encoded.ids) == 5


def test_long_texts_keep_their_head_and_tail() -> None:
    encoder = TextEncoder(backbone_dir() / "tokenizer.json", max_tokens=16, head_tokens=4)
    text = "alpha beta gamma delta " + "filler " * 50 + "omega final verdict terrible"
    (encoded,) = encoder.encode([text])
    assert encoded.truncated and len(encoded.ids) == 16
    full = encoder._tokenizer.encode(text, add_special_tokens=False).ids
    assert encoded.ids[1:5] == full[:4] and encoded.ids[5:-1] == full[-10:]


def test_padding_is_to_the_longest_in_the_batch_not_to_128() -> None:
    encoder = TextEncoder(backbone_dir() / "tokenizer.json", max_tokens=128)
    encoded = encoder.encode(["hi", "a somewhat longer text here"])
    ids, mask = encoder.pad([e.ids for e in encoded])
    assert ids.shape == (2, max(len(e.ids) for e in encoded)) and ids.shape[1] < 20
    assert mask.sum() == sum(len(e.ids) for e in encoded)


def test_ids_are_the_tokenizers_own_alone_and_in_a_batch() -> None:
    """The fast batch path (no offsets) gives the ids of the tokenizer's plain `encode`, for one text or many."""
    encoder = TextEncoder(backbone_dir() / "tokenizer.json", max_tokens=512)
    texts = ["I love it", "Ünïcödé and emoji 😀👍🏽", "zero\u200bwidth", "nul\x00byte", "Refund me NOW!!!", "ok"]
    want = [[101, *encoder._tokenizer.encode(text, add_special_tokens=False).ids, 102] for text in texts]
    assert [e.ids for e in encoder.encode(texts)] == want
    assert [encoder.encode([text])[0].ids for text in texts] == want

"""Pre-tokenised batches (recipec.tasks.data): every example tokenised once, batches identical to
a tokenizer call per batch (the lazy path they replace), pinned memory only where CUDA is."""

from __future__ import annotations

import pytest
import torch

from recipec.tasks import Example, TaskInfo
from recipec.tasks import builtin as builtin_task
from recipec.tasks.data import Collator, make_dataloader

CLS = TaskInfo("t", "classification", 2)
MC = TaskInfo("mc", "multiple_choice", 3, num_choices=3)

WORDS = "the a cold warm river stone quietly bright lamp over under never sky fish sea".split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def singles(n: int) -> list[Example]:
    return [Example(_text(i, 1 + i % 13) + f" {i}", None, i % 2) for i in range(n)]


def pairs(n: int) -> list[Example]:
    return [Example(_text(i, 2 + i % 9), _text(i + 1, 1 + i % 20), i % 2) for i in range(n)]


def choices(n: int) -> list[Example]:
    return [
        Example(
            _text(i, 3 + i % 5) + "?", None, i % 3, tuple(_text(i + c, 1 + c) for c in range(3))
        )
        for i in range(n)
    ]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def lazy_batches(examples, tokenizer, info, loader, **kwargs):
    """What the loader's batches were before the cache: one tokenizer call per batch."""
    lazy = Collator(tokenizer, info, cache=False, **kwargs)
    return [lazy([examples[i] for i in idx]) for idx in loader.batch_indices()]


@pytest.mark.parametrize(
    ("make", "info"), [(singles, CLS), (pairs, CLS), (choices, MC)], ids=["single", "pair", "mc"]
)
@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pretokenized_batches_equal_lazy_batches(embedded_tokenizer, make, info, multiple, side):
    tokenizer = embedded_tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        examples = make(45)
        for epoch in (0, 1):  # the second epoch comes from the cache of the first
            loader = make_dataloader(
                examples,
                tokenizer,
                info,
                batch_size=8,
                max_seq_length=16,  # truncates the longer ones
                shuffle=True,
                seed=3,
                epoch=epoch,
                pad_to_multiple_of=multiple,
            )
            want = lazy_batches(
                examples, tokenizer, info, loader, max_seq_length=16, pad_to_multiple_of=multiple
            )
            got = list(loader)
            assert len(got) == len(want) == 6
            for a, b in zip(want, got):
                assert_same(a, b)
    finally:
        tokenizer.padding_side = before


def test_a_length_that_is_no_multiple_of_the_padding_is_refused(embedded_tokenizer):
    with pytest.raises(ValueError, match="multiple of pad_to_multiple_of"):
        make_dataloader(
            singles(3),
            embedded_tokenizer,
            CLS,
            batch_size=2,
            max_seq_length=12,
            pad_to_multiple_of=8,
        )


def test_the_builtin_task_batches_are_unchanged(embedded_tokenizer):
    train, _ = builtin_task.generate_splits(200, 40)
    loader = make_dataloader(train, embedded_tokenizer, CLS, batch_size=32, shuffle=True, seed=5)
    for a, b in zip(lazy_batches(train, embedded_tokenizer, CLS, loader), loader):
        assert_same(a, b)


class CountingTokenizer:
    """Wraps a tokenizer and counts the texts it is asked to encode."""

    def __init__(self, inner):
        self.inner = inner
        self.texts = 0

    def __call__(self, first, second=None, **kwargs):
        self.texts += len(first)
        return self.inner(first, second, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_every_text_is_tokenised_once(embedded_tokenizer):
    tokenizer = CountingTokenizer(embedded_tokenizer)
    examples = singles(40)
    for epoch in range(3):
        list(make_dataloader(examples, tokenizer, CLS, batch_size=6, shuffle=True, epoch=epoch))
    # a different batch size or seed (oBERT's gradient batches) reuses the encodings too
    list(make_dataloader(examples, tokenizer, CLS, batch_size=16, shuffle=True, seed=9))
    assert tokenizer.texts == 40
    # another length is another encoding
    list(make_dataloader(examples, tokenizer, CLS, batch_size=6, max_seq_length=8))
    assert tokenizer.texts == 80


def test_a_collator_tokenises_what_is_not_cached_yet(embedded_tokenizer):
    tokenizer = CountingTokenizer(embedded_tokenizer)
    examples = pairs(10)
    collate = Collator(tokenizer, CLS, max_seq_length=32)
    assert_same(
        collate(examples[:4]),
        Collator(tokenizer, CLS, max_seq_length=32, cache=False)(examples[:4]),
    )
    assert tokenizer.texts == 4 + 4  # the cached encode, then the lazy reference
    collate(examples[:4])
    assert tokenizer.texts == 8


class NoPadTokenizer(CountingTokenizer):
    pad_token_id = None


def test_a_tokenizer_without_a_pad_token_is_called_per_batch(embedded_tokenizer):
    tokenizer = NoPadTokenizer(embedded_tokenizer)
    examples = singles(6)
    loader = make_dataloader(examples, tokenizer, CLS, batch_size=3)
    assert tokenizer.texts == 0  # nothing pre-tokenised
    batches = list(loader)
    assert tokenizer.texts == 6 and [b["input_ids"].shape[0] for b in batches] == [3, 3]


def test_malformed_examples_are_still_reported_by_the_batch(embedded_tokenizer):
    loader = make_dataloader(
        [Example("a", None, 0), Example("b", "c", 1)], embedded_tokenizer, CLS, batch_size=2
    )
    with pytest.raises(ValueError, match="mixes single sentences and sentence pairs"):
        list(loader)
    with pytest.raises(ValueError, match="expected 3 choices"):
        list(make_dataloader([Example("q", None, 0, ("a",))], embedded_tokenizer, MC, batch_size=1))


def test_pin_memory_is_ignored_without_cuda(embedded_tokenizer, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (batch,) = list(
        make_dataloader(singles(3), embedded_tokenizer, CLS, batch_size=3, pin_memory=True)
    )
    assert not any(t.is_pinned() for t in batch.values())


def test_pin_memory_pins_every_tensor_where_cuda_is(embedded_tokenizer, monkeypatch):
    pinned = []

    def pin(self):
        pinned.append(self.shape)
        return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    (batch,) = list(
        make_dataloader(singles(3), embedded_tokenizer, CLS, batch_size=3, pin_memory=True)
    )
    assert len(pinned) == len(batch) == 4  # input_ids, token_type_ids, attention_mask, labels

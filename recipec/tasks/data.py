"""Tokenisation and deterministic, resumable batching with dynamic padding.

Batches are tokenised lazily, one batch at a time, and padded to the longest sequence in the
batch (not to ``max_seq_length``): for short texts such as SST-2 this is the biggest CPU saving.
The order of an epoch is ``epoch_permutation(n, seed, epoch)``, a pure function of its
arguments, so a run restarted at (epoch, batch) sees exactly the batches it would have seen;
``start_batch`` skips batches without tokenising them.

Batch layout (dict of tensors, ready for ``model(**batch)``):
- classification / regression: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
  the tokenizer makes them) of shape ``[batch, seq]``; ``labels`` ``[batch]`` (int64 or float32).
- multiple choice: the same keys shaped ``[batch, choices, seq]``; ``labels`` ``[batch]`` int64.
- ``labels`` is omitted when the examples are unlabelled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from recipec.tasks.base import Example, TaskInfo

__all__ = ["Collator", "ExampleLoader", "epoch_permutation", "make_dataloader"]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a pure function of its arguments.

    Args:
        n: Number of examples.
        seed: Run seed (non-negative).
        epoch: Epoch index (non-negative).

    Returns:
        An int64 permutation of ``range(n)``.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 0x5EC1])))
    return rng.permutation(n).astype(np.int64)


class Collator:
    """Tokenises a list of examples into one padded batch.

    Usable directly as a ``collate_fn`` (e.g. for a Hugging Face ``Trainer``'s DataLoader).

    Args:
        tokenizer: A Hugging Face tokenizer.
        info: The task (its kind decides the batch layout and label dtype).
        max_seq_length: Truncate every (pair of) text(s) to this many tokens.
        pad_to_multiple_of: Optionally round the padded length up to a multiple of this.
    """

    def __init__(
        self,
        tokenizer: Any,
        info: TaskInfo,
        *,
        max_seq_length: int = 128,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
        self.tokenizer = tokenizer
        self.info = info
        self.max_seq_length = max_seq_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def _encode(self, first: list[str], second: list[str] | None) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                first,
                second,
                truncation=True,
                max_length=self.max_seq_length,
                padding="longest",
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
        )

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Builds one batch; see the module docstring for its layout."""
        if not examples:
            raise ValueError("cannot collate an empty batch")
        if self.info.kind == "multiple_choice":
            n_choices = self.info.num_choices
            for ex in examples:
                if ex.choices is None or len(ex.choices) != n_choices:
                    got = None if ex.choices is None else len(ex.choices)
                    raise ValueError(
                        f"expected {n_choices} choices per example, got {got}: {ex.text!r}"
                    )
            first = [ex.text for ex in examples for _ in range(n_choices)]
            second = [c for ex in examples for c in ex.choices]  # type: ignore[union-attr]
            enc = self._encode(first, second)
            batch = {k: v.view(len(examples), n_choices, -1) for k, v in enc.items()}
        else:
            pairs = [ex.text_pair for ex in examples]
            has_pair = [p is not None for p in pairs]
            if any(has_pair) and not all(has_pair):
                raise ValueError("a batch mixes single sentences and sentence pairs")
            batch = self._encode([ex.text for ex in examples], pairs if all(has_pair) else None)
        labels = [ex.label for ex in examples]
        if all(lab is not None for lab in labels):
            dtype = torch.float32 if self.info.kind == "regression" else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        elif any(lab is not None for lab in labels):
            raise ValueError("a batch mixes labelled and unlabelled examples")
        return batch


class ExampleLoader:
    """Iterates batches of a fixed example list in a seeded, resumable order.

    Each full pass advances ``epoch`` by one and resets ``start_batch`` to 0, so
    ``for epoch in ...: for batch in loader:`` reshuffles every epoch; a pass broken off early
    advances nothing. ``len(loader)`` is the number of batches the next pass yields.

    Args:
        examples: The examples.
        collator: Turns a list of examples into a batch.
        batch_size: Examples per batch.
        shuffle: Use ``epoch_permutation`` order (True) or the original order (False).
        seed: Seed of the permutation.
        epoch: Epoch of the first pass.
        start_batch: Batches of the first pass to skip (resume); they are not tokenised.
        drop_last: Drop a final incomplete batch.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        collator: Collator,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not examples:
            raise ValueError("cannot build a loader over zero examples")
        self.examples = list(examples)
        self.collator = collator
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        self.set_epoch(epoch, start_batch)

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in a full epoch (ignores ``start_batch``)."""
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch (permutation) and the batch the next pass starts at."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def batch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """Example indices of every batch of an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.examples)
        order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
        return [
            order[i * self.batch_size : (i + 1) * self.batch_size]
            for i in range(self.batches_per_epoch)
        ]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.batch_indices()[self.start_batch :]:
            yield self.collator([self.examples[i] for i in idx])
        self.epoch += 1
        self.start_batch = 0


def make_dataloader(
    examples: Sequence[Example],
    tokenizer: Any,
    info: TaskInfo,
    *,
    batch_size: int,
    max_seq_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    start_batch: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    pad_to_multiple_of: int | None = None,
) -> ExampleLoader:
    """Builds a resumable, dynamically padded batch iterator.

    Args:
        examples: Examples of one split.
        tokenizer: A Hugging Face tokenizer.
        info: The task (batch layout, label dtype).
        batch_size: Examples per batch.
        max_seq_length: Truncation length; batches are padded only to their longest sequence.
        shuffle: Shuffle with ``epoch_permutation(len(examples), seed, epoch)``.
        seed: Seed of the order.
        start_batch: Skip this many batches of the first pass (resume mid-epoch).
        epoch: The epoch of the first pass.
        drop_last: Drop the last incomplete batch.
        pad_to_multiple_of: Optionally round padded lengths up to a multiple of this.

    Returns:
        An ``ExampleLoader`` yielding dicts of tensors for ``model(**batch)``.
    """
    collator = Collator(
        tokenizer, info, max_seq_length=max_seq_length, pad_to_multiple_of=pad_to_multiple_of
    )
    return ExampleLoader(
        examples,
        collator,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        start_batch=start_batch,
        drop_last=drop_last,
    )

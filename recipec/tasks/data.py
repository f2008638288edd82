"""Tokenisation and deterministic, resumable batching with dynamic padding.

Every example is tokenised once: ``make_dataloader`` pre-tokenises the examples it is given
(one batched tokenizer call, cached per tokenizer and ``max_seq_length`` for the life of the
tokenizer, so later epochs, evaluations and oBERT's gradient batches reuse the encodings), and a
batch only pads the cached encodings to the longest sequence in the batch (not to
``max_seq_length``): for short texts such as SST-2 this is the biggest CPU saving. The padded
batch is exactly what one tokenizer call on the batch's texts gives (same ids, masks, token
types, padding side, ``pad_to_multiple_of``); a tokenizer whose outputs the cache cannot pad
(other model inputs, no pad token) is called per batch as before.
The order of an epoch is ``epoch_permutation(n, seed, epoch)``, a pure function of its
arguments, so a run restarted at (epoch, batch) sees exactly the batches it would have seen;
``start_batch`` skips batches without collating them.

Batch layout (dict of tensors, ready for ``model(**batch)``):
- classification / regression: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
  the tokenizer makes them) of shape ``[batch, seq]``; ``labels`` ``[batch]`` (int64 or float32).
- multiple choice: the same keys shaped ``[batch, choices, seq]``; ``labels`` ``[batch]`` int64.
- ``labels`` is omitted when the examples are unlabelled.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
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


class _Encodings:
    """The cached encodings of one tokenizer at one ``max_seq_length``: the model input names
    (``keys``, as the tokenizer returns them) and, per (first text, second text or None), an
    int32 array ``[len(keys), tokens]`` (unpadded)."""

    def __init__(self) -> None:
        self.keys: tuple[str, ...] | None = None
        self.rows: dict[tuple[str, str | None], np.ndarray] = {}
        self.usable = True


# Per tokenizer (weakly: the cache goes with it), per max_seq_length.
_ENCODINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The model inputs a cached encoding can be padded for, with their padding values (None: the
# tokenizer's pad token / pad token type).
_PADDABLE = ("input_ids", "token_type_ids", "attention_mask")
_ENCODE_CHUNK = 4096  # texts per pre-tokenising call


class Collator:
    """Turns a list of examples into one padded batch.

    Usable directly as a ``collate_fn`` (e.g. for a Hugging Face ``Trainer``'s DataLoader).
    Encodings are cached: each distinct text (pair) is tokenised once per tokenizer and
    ``max_seq_length`` (:meth:`pretokenize` does it for a whole example list in one call), and a
    batch pads the cached encodings exactly as a tokenizer call on the batch would.

    Args:
        tokenizer: A Hugging Face tokenizer.
        info: The task (its kind decides the batch layout and label dtype).
        max_seq_length: Truncate every (pair of) text(s) to this many tokens.
        pad_to_multiple_of: Optionally round the padded length up to a multiple of this.
        pin_memory: Put the batch's tensors in pinned memory (fast, asynchronous copies to a
            CUDA device; ignored where CUDA is unavailable).
        cache: Reuse cached encodings (False: tokenise every batch from its texts).
    """

    def __init__(
        self,
        tokenizer: Any,
        info: TaskInfo,
        *,
        max_seq_length: int = 128,
        pad_to_multiple_of: int | None = None,
        pin_memory: bool = False,
        cache: bool = True,
    ) -> None:
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
        if pad_to_multiple_of and max_seq_length % pad_to_multiple_of:
            raise ValueError(  # as the tokenizer says it of every batch
                f"max_seq_length ({max_seq_length}) must be a multiple of pad_to_multiple_of "
                f"({pad_to_multiple_of})"
            )
        self.tokenizer = tokenizer
        self.info = info
        self.max_seq_length = max_seq_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self._store, self._pads = self._cache_for(tokenizer) if cache else (None, None)

    def _cache_for(self, tokenizer: Any) -> tuple[_Encodings | None, dict[str, int] | None]:
        """This tokenizer's cache at this length, and the padding values (read once, here:
        a background thread may collate later); (None, None) when it cannot be cached."""
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None or getattr(tokenizer, "padding_side", "right") not in ("right", "left"):
            return None, None
        pads = {
            "input_ids": int(pad_id),
            "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            "attention_mask": 0,
        }
        try:
            per_length = _ENCODINGS.setdefault(tokenizer, {})
        except TypeError:  # not weakly referenceable or not hashable: no cache
            return None, None
        return per_length.setdefault(self.max_seq_length, _Encodings()), pads

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

    def pretokenize(self, examples: Iterable[Example]) -> None:
        """Tokenise (once, in large batched calls) every text pair of ``examples`` not yet
        cached; malformed examples are left for :meth:`__call__` to report."""
        store = self._store
        if store is None or not store.usable:
            return
        todo = list(dict.fromkeys(p for ex in examples for p in self._pairs_of(ex)))
        todo = [p for p in todo if p not in store.rows]
        for i in range(0, len(todo), _ENCODE_CHUNK):
            self._add(todo[i : i + _ENCODE_CHUNK])

    def _pairs_of(self, ex: Example) -> list[tuple[str, str | None]]:
        if self.info.kind == "multiple_choice":
            return [(ex.text, c) for c in ex.choices or ()]
        return [(ex.text, ex.text_pair)]

    def _add(self, pairs: list[tuple[str, str | None]]) -> None:
        """Tokenise ``pairs`` (no padding) into the cache; singles and pairs in separate calls."""
        store = self._store
        assert store is not None
        for with_pair in (False, True):
            group = [p for p in pairs if (p[1] is not None) == with_pair]
            if not group:
                continue
            enc = self.tokenizer(
                [p[0] for p in group],
                [p[1] for p in group] if with_pair else None,
                truncation=True,
                max_length=self.max_seq_length,
            )
            keys = tuple(enc.keys())
            if (
                not set(keys) <= set(_PADDABLE)
                or "input_ids" not in keys
                or store.keys not in (None, keys)
            ):
                store.usable = False  # other model inputs: tokenise per batch as before
                return
            store.keys = keys
            for i, pair in enumerate(group):
                store.rows[pair] = np.asarray([enc[k][i] for k in keys], dtype=np.int32)

    def _from_cache(self, pairs: list[tuple[str, str | None]]) -> dict[str, torch.Tensor] | None:
        """The padded batch of ``pairs`` from cached encodings (None: not cacheable)."""
        store = self._store
        if store is None or not store.usable:
            return None
        missing = list(dict.fromkeys(p for p in pairs if p not in store.rows))
        if missing:
            self._add(missing)
            if not store.usable:
                return None
        rows = [store.rows[p] for p in pairs]
        width = max(r.shape[1] for r in rows)
        multiple = self.pad_to_multiple_of
        if multiple and width % multiple:
            width += multiple - width % multiple
        keys = store.keys
        assert keys is not None
        out = np.empty((len(keys), len(rows), width), dtype=np.int64)
        for k, key in enumerate(keys):
            out[k] = self._pads[key]
        left = self.tokenizer.padding_side == "left"
        for i, row in enumerate(rows):
            n = row.shape[1]
            if left:
                out[:, i, width - n :] = row
            else:
                out[:, i, :n] = row
        return {key: torch.from_numpy(out[k]) for k, key in enumerate(keys)}

    def _texts(self, first: list[str], second: list[str] | None) -> dict[str, torch.Tensor]:
        pairs = list(zip(first, second if second is not None else [None] * len(first)))
        batch = self._from_cache(pairs)
        return batch if batch is not None else self._encode(first, second)

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
            enc = self._texts(first, second)
            batch = {k: v.view(len(examples), n_choices, -1) for k, v in enc.items()}
        else:
            pairs = [ex.text_pair for ex in examples]
            has_pair = [p is not None for p in pairs]
            if any(has_pair) and not all(has_pair):
                raise ValueError("a batch mixes single sentences and sentence pairs")
            batch = self._texts([ex.text for ex in examples], pairs if all(has_pair) else None)
        labels = [ex.label for ex in examples]
        if all(lab is not None for lab in labels):
            dtype = torch.float32 if self.info.kind == "regression" else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        elif any(lab is not None for lab in labels):
            raise ValueError("a batch mixes labelled and unlabelled examples")
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
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
    pin_memory: bool = False,
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
        pin_memory: Batches in pinned memory (for ``.to("cuda", non_blocking=True)``).

    Returns:
        An ``ExampleLoader`` yielding dicts of tensors for ``model(**batch)``. The examples are
        tokenised here, once (cached for later loaders over the same texts and tokenizer).
    """
    collator = Collator(
        tokenizer,
        info,
        max_seq_length=max_seq_length,
        pad_to_multiple_of=pad_to_multiple_of,
        pin_memory=pin_memory,
    )
    collator.pretokenize(examples)
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

"""A small synthetic sentiment task generated offline, so every command works without data.

Each example is a short review-like sentence about a subject with an evaluative adjective.
The label is the adjective's polarity, flipped when the main clause is negated
(``"the soup was not great"`` is negative). Distractors keep it from being a token lookup:
neutral openers/closers, intensifiers, and a contrast clause (``"although the parking was
awful, ..."``, ``"the menu was dull, but ..."``) whose polarity is random and must be ignored,
and an occasional outer negation (``"it is not true that ..."``). Every adjective and negator occurs
with both labels, so no single word predicts the label well, yet a pretrained encoder
(all-MiniLM-L6-v2) learns it to >85% dev accuracy in a few hundred steps.

All word lists and templates are written for this project. Generation is deterministic for a
given seed (Python's ``random.Random``), classes are balanced, and dev sentences never occur in
the train split.
"""

from __future__ import annotations

import random

from recipec.tasks.base import Example, TaskData, TaskInfo

__all__ = [
    "CLOSERS",
    "CONTRAST_AFTER",
    "CONTRAST_BEFORE",
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "INTENSIFIERS",
    "LABEL_NAMES",
    "NEGATED_VERBS",
    "NEGATIVE_WORDS",
    "OPENERS",
    "OUTER_NEGATIONS",
    "POSITIVE_WORDS",
    "SUBJECTS",
    "VERBS",
    "compose",
    "generate",
    "generate_splits",
    "load_builtin",
]

DEFAULT_TRAIN_SIZE = 2000
DEFAULT_EVAL_SIZE = 400
LABEL_NAMES = ("negative", "positive")

SUBJECTS = (
    "movie",
    "soundtrack",
    "hotel room",
    "pasta",
    "service",
    "plot",
    "new phone",
    "concert",
    "lecture",
    "museum tour",
    "support team",
    "ending",
    "garden",
    "coffee",
    "train ride",
    "novel",
    "workshop",
    "bakery",
    "camera",
    "game",
    "podcast",
    "bicycle",
    "stadium",
    "menu",
)
POSITIVE_WORDS = (
    "great",
    "wonderful",
    "delightful",
    "superb",
    "charming",
    "excellent",
    "lovely",
    "brilliant",
    "pleasant",
    "impressive",
    "fantastic",
    "enjoyable",
    "gorgeous",
    "terrific",
)
NEGATIVE_WORDS = (
    "awful",
    "dull",
    "terrible",
    "boring",
    "dreadful",
    "poor",
    "disappointing",
    "bland",
    "mediocre",
    "tedious",
    "horrible",
    "clumsy",
    "miserable",
    "sloppy",
)
VERBS = ("was", "is", "seemed", "felt", "looked", "turned out")
NEGATED_VERBS = (
    "was not",
    "is not",
    "was never",
    "did not seem",
    "never felt",
    "wasn't",
    "isn't",
    "was anything but",
    "did not look",
)
INTENSIFIERS = ("", "", "", "really", "truly", "quite", "very", "rather", "pretty")
OPENERS = (
    "",
    "",
    "",
    "honestly,",
    "to be fair,",
    "in my view,",
    "last night",
    "on the whole,",
    "as usual,",
    "my sister says",
    "i think",
)
CLOSERS = (
    "",
    "",
    "",
    "overall",
    "this time",
    "if you ask me",
    "for the price",
    "in the end",
    "again",
)
CONTRAST_BEFORE = (
    "although {clause},",
    "even though {clause},",
    "while {clause},",
    "{clause}, but",
    "{clause}, yet",
)
CONTRAST_AFTER = (", even though {clause}", ", although {clause}", ", though {clause}")
OUTER_NEGATIONS = ("it is not true that", "i would not say that", "nobody could claim that")

_NEGATION_RATE = 0.45
_CONTRAST_RATE = 0.4
_OUTER_NEGATION_RATE = 0.15


def compose(
    subject: str,
    adjective: str,
    *,
    negated_verb: str | None = None,
    verb: str = "was",
    intensifier: str = "",
    opener: str = "",
    closer: str = "",
    contrast: str | None = None,
    contrast_template: str = CONTRAST_BEFORE[0],
    outer_negation: str | None = None,
) -> tuple[str, int]:
    """Builds one sentence and its label.

    Args:
        subject: What the sentence is about, e.g. ``"movie"``.
        adjective: A word from ``POSITIVE_WORDS`` or ``NEGATIVE_WORDS``.
        negated_verb: A phrase from ``NEGATED_VERBS``; when given it replaces ``verb`` and flips
            the label.
        verb: The plain verb phrase used when not negated.
        intensifier: Optional adverb before the adjective.
        opener: Optional neutral opening phrase.
        closer: Optional neutral closing phrase.
        contrast: Optional distractor clause (e.g. ``"the menu was dull"``) that does not
            change the label.
        contrast_template: One of ``CONTRAST_BEFORE`` / ``CONTRAST_AFTER``; says where the
            contrast clause goes. In every template the main clause carries the label
            (``"although A, B"``, ``"A, but B"`` and ``"B, even though A"`` are all about B).
        outer_negation: A phrase from ``OUTER_NEGATIONS`` put before the main clause; flips the
            label again (``"it is not true that the soup was not great"`` is positive).

    Returns:
        ``(text, label)`` with label 1 = positive, 0 = negative.
    """
    if adjective in POSITIVE_WORDS:
        polarity = 1
    elif adjective in NEGATIVE_WORDS:
        polarity = 0
    else:
        raise ValueError(f"{adjective!r} is not in POSITIVE_WORDS or NEGATIVE_WORDS")
    label = 1 - polarity if negated_verb else polarity
    if outer_negation:
        label = 1 - label
    main = _join(outer_negation or "", "the", subject, negated_verb or verb, intensifier, adjective)
    if contrast is None:
        text = _join(opener, main, closer)
    elif contrast_template in CONTRAST_BEFORE:
        text = _join(opener, contrast_template.format(clause=contrast), main, closer)
    elif contrast_template in CONTRAST_AFTER:
        text = _join(opener, main, closer) + contrast_template.format(clause=contrast)
    else:
        raise ValueError(f"unknown contrast template {contrast_template!r}")
    return text, label


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _sample(rng: random.Random, label: int) -> str:
    """Draws one sentence whose label is ``label``."""
    negated = rng.random() < _NEGATION_RATE
    polarity = 1 - label if negated else label
    adjective = rng.choice(POSITIVE_WORDS if polarity else NEGATIVE_WORDS)
    subject = rng.choice(SUBJECTS)
    kwargs: dict = {
        "negated_verb": rng.choice(NEGATED_VERBS) if negated else None,
        "verb": rng.choice(VERBS),
        "intensifier": rng.choice(INTENSIFIERS),
    }
    if rng.random() < _OUTER_NEGATION_RATE:
        kwargs["outer_negation"] = rng.choice(OUTER_NEGATIONS)
        polarity = 1 - polarity
        adjective = rng.choice(POSITIVE_WORDS if polarity else NEGATIVE_WORDS)
    if rng.random() < _CONTRAST_RATE:
        other = rng.choice([s for s in SUBJECTS if s != subject])
        other_adj = rng.choice(POSITIVE_WORDS + NEGATIVE_WORDS)
        kwargs["contrast"] = _join("the", other, rng.choice(VERBS), other_adj)
        kwargs["contrast_template"] = rng.choice(CONTRAST_BEFORE + CONTRAST_AFTER)
    else:
        kwargs["opener"] = "" if "outer_negation" in kwargs else rng.choice(OPENERS)
        kwargs["closer"] = rng.choice(CLOSERS)
    text, got = compose(subject, adjective, **kwargs)
    assert got == label
    return text


def generate(n: int, seed: int = 0, *, exclude: set[str] | None = None) -> list[Example]:
    """Generates ``n`` balanced examples deterministically.

    Args:
        n: Number of examples.
        seed: Random seed; the same seed always gives the same examples.
        exclude: Sentences that must not be produced (used to keep dev disjoint from train).

    Returns:
        A list of ``Example`` with integer labels (0 negative, 1 positive).
    """
    if n < 1:
        raise ValueError(f"the built-in task needs at least 1 example, got {n}")
    rng = random.Random(f"recipec-builtin-{seed}")
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    exclude = exclude or set()
    out: list[Example] = []
    for label in labels:
        for _ in range(1000):
            text = _sample(rng, label)
            if text not in exclude:
                break
        out.append(Example(text=text, label=label))
    return out


def generate_splits(
    n_train: int = DEFAULT_TRAIN_SIZE, n_eval: int = DEFAULT_EVAL_SIZE, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Generates a train and a dev split; dev sentences never appear in train.

    Args:
        n_train: Train size.
        n_eval: Dev size.
        seed: Random seed.

    Returns:
        ``(train, dev)`` example lists.
    """
    train = generate(n_train, seed)
    dev = generate(n_eval, seed + 1_000_003, exclude={ex.text for ex in train})
    return train, dev


def load_builtin(max_train: int | None, max_eval: int | None, seed: int) -> TaskData:
    """The built-in task as ``TaskData``: ``max_train``/``max_eval`` are the generated sizes."""
    train, dev = generate_splits(
        max_train or DEFAULT_TRAIN_SIZE, max_eval or DEFAULT_EVAL_SIZE, seed
    )
    info = TaskInfo(
        name="builtin",
        kind="classification",
        num_labels=2,
        metrics=("accuracy", "f1"),
        primary_metric="accuracy",
        label_names=LABEL_NAMES,
        source=f"recipec built-in synthetic sentiment task (seed {seed})",
    )
    return TaskData(info, train, dev)

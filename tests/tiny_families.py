"""Tiny random models of every encoder family recipec supports, and their checkpoint folders.

``FAMILIES`` is the test matrix (README's "Supported architectures" table lists the same
families, checked by ``tests/cli/test_families.py``). Each model has 2 layers (ALBERT: one shared
layer run 3 times), hidden 64, 4 heads of 16 and an FFN of 128, close to its public checkpoints'
settings otherwise. :func:`save_folder` writes one as a user's own checkpoint: a
``save_pretrained`` folder with a tiny WordPiece tokenizer (letters and ``##`` letters, so no
word is unknown) whose padding, CLS and SEP ids are the config's, built offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

SMALL = dict(
    vocab_size=99,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)

# family -> (display name in the README, has a multiple-choice head in transformers)
FAMILIES: dict[str, tuple[str, bool]] = {
    "bert": ("BERT", True),
    "minilm": ("MiniLM", True),
    "roberta": ("RoBERTa", True),
    "xlm-roberta": ("XLM-RoBERTa", True),
    "camembert": ("CamemBERT", True),
    "distilbert": ("DistilBERT", True),
    "electra": ("ELECTRA", True),
    "deberta-v2": ("DeBERTa-v2/v3", True),
    "mpnet": ("MPNet", True),
    "albert": ("ALBERT", True),
    "modernbert": ("ModernBERT", True),
    # DeBERTa v1: AutoModelForMultipleChoice has no DeBERTa (v1) class.
    "deberta": ("DeBERTa", False),
}
CASES = [(f, "seq") for f in FAMILIES] + [(f, "mc") for f, (_, mc) in FAMILIES.items() if mc]


def config(family: str, **overrides):
    """A tiny config of ``family`` (keys of :data:`FAMILIES`)."""
    if family in ("bert", "roberta", "xlm-roberta", "camembert"):
        cls = {
            "bert": tf.BertConfig,
            "roberta": tf.RobertaConfig,
            "xlm-roberta": tf.XLMRobertaConfig,
            "camembert": tf.CamembertConfig,
        }[family]
        made = cls(**SMALL)
    elif family == "minilm":  # all-MiniLM-L6-v2 proportions: BERT with narrow heads
        made = tf.BertConfig(**{**SMALL, "hidden_size": 48, "intermediate_size": 192})
    elif family == "distilbert":
        made = tf.DistilBertConfig(
            vocab_size=99, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64
        )
    elif family == "electra":
        made = tf.ElectraConfig(embedding_size=32, **SMALL)
    elif family == "deberta-v2":  # deberta-v3-* settings
        made = tf.DebertaV2Config(
            **SMALL,
            relative_attention=True,
            pos_att_type="p2c|c2p",
            position_buckets=16,
            max_relative_positions=-1,
            share_att_key=True,
            norm_rel_ebd="layer_norm",
            position_biased_input=False,
        )
    elif family == "deberta":  # deberta-base settings
        made = tf.DebertaConfig(
            **SMALL, relative_attention=True, pos_att_type="c2p|p2c", position_biased_input=False
        )
    elif family == "mpnet":
        made = tf.MPNetConfig(**SMALL)
    elif family == "albert":
        made = tf.AlbertConfig(embedding_size=32, **{**SMALL, "num_hidden_layers": 3})
    elif family == "modernbert":
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        made = tf.ModernBertConfig(**SMALL, **ids)
    else:
        raise KeyError(family)
    for key, value in overrides.items():
        setattr(made, key, value)
    return made


def model(family: str, head: str = "seq", seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh tiny model in eval mode; ``head``: ``"seq"`` or ``"mc"`` (multiple choice)."""
    torch.manual_seed(seed)
    auto = tf.AutoModelForSequenceClassification if head == "seq" else tf.AutoModelForMultipleChoice
    return auto.from_config(config(family, **overrides)).eval()


def _special_tokens(cfg) -> list[str]:
    """The five special tokens ordered so that padding, CLS (BOS) and SEP (EOS) have the
    config's ids where it sets them (RoBERTa: CLS 0, PAD 1, SEP 2)."""
    slots: list[str | None] = [None] * 5
    wanted = (
        ("[PAD]", getattr(cfg, "pad_token_id", None)),
        ("[CLS]", getattr(cfg, "cls_token_id", None) or getattr(cfg, "bos_token_id", None)),
        ("[SEP]", getattr(cfg, "sep_token_id", None) or getattr(cfg, "eos_token_id", None)),
    )
    for token, index in wanted:
        if isinstance(index, int) and 0 <= index < 5 and slots[index] is None:
            slots[index] = token
    rest = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in slots]
    return [s if s is not None else rest.pop(0) for s in slots]


WORDS = "the a was is not but very and it of to my this that".split()


def tokenizer(cfg, folder: Path):
    """A WordPiece tokenizer of at most ``cfg.vocab_size`` tokens, saved in ``folder``."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = _special_tokens(cfg) + WORDS + letters + [f"##{c}" for c in letters] + list(".,?!'")
    assert len(vocab) <= cfg.vocab_size, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    made = tf.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    (folder / "vocab.txt").unlink()
    made.save_pretrained(folder)
    return made


def save_folder(family: str, head: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """``folder`` as a user's checkpoint: the model's ``save_pretrained`` files and a tokenizer."""
    made = model(family, head, seed, **overrides)
    made.save_pretrained(folder)
    tokenizer(made.config, folder)
    return folder


def csqa_files(folder: Path, train: int = 16, dev: int = 8) -> Path:
    """A tiny CommonsenseQA-style data folder (5 choices): ``train.jsonl`` and ``dev.jsonl``."""
    import json
    import random

    rng = random.Random(0)
    things = "kitchen garage moon shoe river table window bread cloud piano".split()
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("dev", dev)):
        rows = []
        for i in range(n):
            texts = rng.sample(things, 5)
            rows.append(
                {
                    "id": f"{split}{i}",
                    "question": {
                        "stem": f"where is the {rng.choice(things)} kept?",
                        "choices": [{"label": lab, "text": t} for lab, t in zip("ABCDE", texts)],
                    },
                    "answerKey": rng.choice("ABCDE"),
                }
            )
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder

"""Which parameters the default recipe prunes, and the per-component cost table."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import recipec
from recipec.modifiers.base import CompileError
from recipec.recipe.load import load_recipe_text
from recipec.recipe.schema import DEFAULT_TARGETS
from recipec.sparsity.selection import (
    SelectionError,
    component_of,
    cost_table,
    require_parameters,
    select_parameters,
)

BERT_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
DISTILBERT_LINEARS = (
    "attention.q_lin",
    "attention.k_lin",
    "attention.v_lin",
    "attention.out_lin",
    "ffn.lin1",
    "ffn.lin2",
)


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
        return BertForSequenceClassification(cfg)
    if kind == "roberta":
        cfg = RobertaConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=34,
        )
        return RobertaForSequenceClassification(cfg)
    if kind == "distilbert":
        cfg = DistilBertConfig(
            vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32
        )
        return DistilBertForSequenceClassification(cfg)
    raise ValueError(kind)


def _minilm_config() -> BertConfig:
    """The shape of all-MiniLM-L6-v2: a BERT with 6 layers, hidden 384, 12 heads, FFN 1536."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )


def _expected(
    prefix: str, layers: int, linears: tuple[str, ...], stack: str = "encoder"
) -> set[str]:
    return {f"{prefix}{stack}.layer.{i}.{lin}.weight" for i in range(layers) for lin in linears}


def _compile_gmp(model, targets=None, exclude=None):
    data = {
        "training": {"steps": 4},
        "modifiers": [{"type": "gmp", "final_sparsity": 0.5, "start_step": 0, "end_step": 0}],
    }
    if targets is not None:
        data["targets"] = targets
    if exclude is not None:
        data["exclude"] = exclude
    recipe = load_recipe_text(yaml.safe_dump(data))
    return recipec.compile(recipe, model, None, steps_per_epoch=4)


CASES = [
    ("bert", "bert.", BERT_LINEARS, "encoder"),
    ("roberta", "roberta.", BERT_LINEARS, "encoder"),
    ("distilbert", "distilbert.", DISTILBERT_LINEARS, "transformer"),
]


@pytest.mark.parametrize(("kind", "prefix", "linears", "stack"), CASES, ids=[c[0] for c in CASES])
def test_default_targets_are_exactly_the_encoder_linears(kind, prefix, linears, stack):
    model = _tiny(kind)
    expected = _expected(prefix, 2, linears, stack)
    assert len(expected) == 12
    selected = select_parameters(model, DEFAULT_TARGETS)
    assert set(selected) == expected
    # The compiled program prunes exactly these (the recipe's default targets).
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    program = _compile_gmp(model)
    (gmp,) = program.modifiers
    assert set(gmp.targets) == expected
    program.step_start(0)  # one-shot 50%
    assert set(program.masks.masks) == expected
    assert program.sparsity()[0] == 0.5  # global ranking over the targets
    for name, param in model.named_parameters():
        if name in expected:
            assert torch.equal(param == 0, ~program.masks.masks[name]), name
        else:
            # Embeddings, pooler, classifier heads, biases and norms are untouched.
            assert torch.equal(param, before[name]), name
            assert component_of(name) in (
                "embeddings",
                "layernorm",
                "pooler",
                "head",
            ) or name.endswith(".bias"), name


def test_default_targets_minilm_shape():
    config = _minilm_config()
    with torch.device("meta"):
        bare = BertModel(config, add_pooling_layer=True)  # how all-MiniLM-L6-v2 ships (no prefix)
        classifier = BertForSequenceClassification(config)
    assert set(select_parameters(bare, DEFAULT_TARGETS)) == _expected("", 6, BERT_LINEARS)
    selected = select_parameters(classifier, DEFAULT_TARGETS)
    assert set(selected) == _expected("bert.", 6, BERT_LINEARS)
    shapes = {
        name.split("layer.0.")[-1]: tuple(p.shape)
        for name, p in selected.items()
        if ".layer.0." in name
    }
    assert shapes == {
        "attention.self.query.weight": (384, 384),
        "attention.self.key.weight": (384, 384),
        "attention.self.value.weight": (384, 384),
        "attention.output.dense.weight": (384, 384),
        "intermediate.dense.weight": (1536, 384),
        "output.dense.weight": (384, 1536),
    }
    assert not any(n.startswith(("bert.embeddings", "bert.pooler", "classifier")) for n in selected)


def test_exclude_removes_matching_targets():
    model = _tiny("bert")
    program = _compile_gmp(model, exclude=[r"layer\.0\.", r"intermediate"])
    (gmp,) = program.modifiers
    assert set(gmp.targets) == {
        f"bert.encoder.layer.1.{lin}.weight" for lin in BERT_LINEARS if lin != "intermediate.dense"
    }


def test_targets_matching_nothing_list_sample_names():
    model = _tiny("bert")
    with pytest.raises(CompileError) as info:
        _compile_gmp(model, targets=[r"decoder\.layers\.\d+\.fc1\.weight$"])
    message = str(info.value)
    assert "match no parameter" in message
    assert "BertForSequenceClassification" in message
    assert "bert.embeddings.word_embeddings.weight" in message  # sample names to fix the regex with
    assert "fc1" in message  # the offending regex is quoted back


def test_exclude_removing_everything_is_an_error():
    model = _tiny("distilbert")
    with pytest.raises(CompileError, match="match no parameter"):
        _compile_gmp(model, exclude=["transformer"])


@pytest.mark.parametrize(
    "targets",
    [
        [r"LayerNorm"],
        [r"attention\.self\.query\.(weight|bias)$"],
        [r"embeddings\.LayerNorm\.weight$"],
        [r"sa_layer_norm"],
    ],
)
def test_one_dimensional_targets_are_refused(targets):
    model = _tiny("distilbert" if "sa_layer_norm" in targets[0] else "bert")
    with pytest.raises(CompileError, match=r"1-D tensor \(bias or norm\)"):
        _compile_gmp(model, targets=targets)
    with pytest.raises(SelectionError):
        require_parameters(model, targets)


def test_two_dimensional_non_default_targets_are_allowed():
    # Embeddings are not pruned by default, but a user may ask for them explicitly.
    model = _tiny("bert")
    program = _compile_gmp(model, targets=[r"word_embeddings\.weight$"])
    assert set(program.modifiers[0].targets) == {"bert.embeddings.word_embeddings.weight"}


def _shares(table):
    total_params = sum(c.params for c in table)
    total_flops = sum(c.flops for c in table)
    rows = {c.component: c.row(total_params, total_flops) for c in table}
    return rows, total_params, total_flops


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_cost_table_shares_sum_to_100(kind):
    model = _tiny(kind)
    table = cost_table(model, seq_len=16)
    rows, total_params, _ = _shares(table)
    assert total_params == sum(p.numel() for p in model.parameters())
    assert sum(r[2] for r in rows.values()) == pytest.approx(100.0, abs=1e-9)
    assert sum(r[3] for r in rows.values()) == pytest.approx(100.0, abs=1e-9)
    assert "other" not in rows  # every parameter is attributed to a named component


def test_cost_table_bert_base_at_seq_128():
    config = BertConfig()  # BERT-base: 12 layers, hidden 768, FFN 3072, vocab 30522
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    targets = set(select_parameters(model, DEFAULT_TARGETS))
    table = cost_table(model, seq_len=128, targets=targets)
    rows, total_params, total_flops = _shares(table)
    by = {c.component: c for c in table}
    # Hand FLOPs of the encoder linears: 2 * tokens * in * out per layer.
    L, h, f, s = 12, 768, 3072, 128
    assert by["attention.qkv"].flops == pytest.approx(L * 3 * 2 * s * h * h)
    assert by["attention.output"].flops == pytest.approx(L * 2 * s * h * h)
    assert by["ffn.in"].flops == pytest.approx(L * 2 * s * h * f)
    assert by["ffn.out"].flops == pytest.approx(L * 2 * s * f * h)
    encoder = ("attention.qkv", "attention.output", "ffn.in", "ffn.out")
    encoder_flop_share = sum(rows[c][3] for c in encoder)
    assert encoder_flop_share > 90.0
    # Embeddings: a large share of the parameters and no matmul FLOPs at all.
    assert rows["embeddings"][3] == 0.0
    assert 20.0 < rows["embeddings"][2] < 25.0
    assert by["embeddings"].params == (30522 + 512 + 2) * 768 + 2 * 768
    # Pooler and classifier run on one token: a negligible FLOP share.
    assert rows["pooler"][3] + rows["head"][3] < 0.01
    # pruned_params counts exactly the default targets, all in the encoder linears.
    assert sum(c.pruned_params for c in table) == sum(
        p.numel() for n, p in model.named_parameters() if n in targets
    )
    assert {c.component for c in table if c.pruned_params} == set(encoder)
    assert total_flops > 0 and total_params == sum(p.numel() for p in model.parameters())

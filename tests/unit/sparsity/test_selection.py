"""Which parameters a recipe prunes (``targets: encoder`` or regexes), the checks that refuse a
recipe leaving encoder linear layers silently dense, and the per-component cost table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tiny_families
import torch
import yaml
from transformers import (
    BertConfig,
    BertForMultipleChoice,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import recipec
from recipec import architectures as arch
from recipec.modifiers.base import CompileError
from recipec.recipe.load import load_recipe, load_recipe_text
from recipec.sparsity.selection import (
    SelectionError,
    check_targets,
    cost_table,
    grouped_names,
    layer_rows,
    require_parameters,
    select_parameters,
)

RECIPES = sorted((Path(__file__).resolve().parents[3] / "recipes").rglob("*.yaml"))

# The default targets before `targets: encoder` (BERT/RoBERTa/MiniLM and DistilBERT names):
# bundled recipes must select on BERT-family models exactly what these did.
LEGACY_DEFAULT_TARGETS = (
    r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)\.weight$",
    r"transformer\.layer\.\d+\.(attention\.(q_lin|k_lin|v_lin|out_lin)|ffn\.lin[12])\.weight$",
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


def _recipe(targets=None, exclude=None, modifiers=None):
    data = {
        "training": {"steps": 4},
        "modifiers": modifiers
        or [{"type": "gmp", "final_sparsity": 0.5, "start_step": 0, "end_step": 0}],
    }
    if targets is not None:
        data["targets"] = targets
    if exclude is not None:
        data["exclude"] = exclude
    return load_recipe_text(yaml.safe_dump(data))


def _compile_gmp(model, targets=None, exclude=None):
    return recipec.compile(_recipe(targets, exclude), model, None, steps_per_epoch=4)


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
    assert set(select_parameters(model, "encoder")) == expected
    # The compiled program prunes exactly these (the recipe's default targets).
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    program = _compile_gmp(model)
    (gmp,) = program.modifiers
    assert set(gmp.targets) == expected
    program.step_start(0)  # one-shot 50%
    assert set(program.masks.masks) == expected
    assert program.sparsity()[0] == 0.5  # global ranking over the targets
    components = arch.param_components(model)
    for name, param in model.named_parameters():
        if name in expected:
            assert torch.equal(param == 0, ~program.masks.masks[name]), name
        else:
            # Embeddings, pooler, classifier heads, biases and norms are untouched.
            assert torch.equal(param, before[name]), name
            assert components[name] in (
                "embeddings",
                "layernorm",
                "pooler",
                "head",
            ) or name.endswith(".bias"), name


def _regex_selection(model, targets, exclude) -> set[str]:
    """What a regex recipe selected before: ``re.search`` over ``named_parameters``."""
    return {
        name
        for name, _ in model.named_parameters()
        if any(re.search(t, name) for t in targets) and not any(re.search(x, name) for x in exclude)
    }


def _bert_family_models():
    with torch.device("meta"):
        yield "minilm-bare", BertModel(_minilm_config(), add_pooling_layer=True)
        yield "minilm", BertForSequenceClassification(_minilm_config())
        yield "minilm-mc", BertForMultipleChoice(_minilm_config())
    yield "bert", _tiny("bert")
    yield "distilbert", _tiny("distilbert")
    yield "roberta", _tiny("roberta")
    try:
        from recipec.models import ModelLoadError, meta_model

        yield "embedded", meta_model(None)
    except (ImportError, ModelLoadError):
        pass


def _tensor_pruners(path):
    recipe = load_recipe(path)
    return [
        m for s in recipe.resolved_stages() for m in s.modifiers if m.prunes and not m.structured
    ]


# layers_kd and other structure-only recipes select no tensors (tested in test_structured.py)
TENSOR_PRUNING = [p for p in RECIPES if _tensor_pruners(p)]


@pytest.mark.parametrize("path", TENSOR_PRUNING, ids=lambda p: p.name)
def test_bundled_recipes_select_what_they_did_on_bert_models(path):
    """`targets: encoder` (the default) selects the tensors of the old default regexes on
    BERT, MiniLM (the embedded model too), RoBERTa and DistilBERT; explicit regexes are
    unchanged."""
    recipe = load_recipe(path)
    pruners = _tensor_pruners(path)
    for name, model in _bert_family_models():
        for spec in pruners:
            targets, exclude = recipe.targets_of(spec)
            old = LEGACY_DEFAULT_TARGETS if targets == "encoder" else targets
            expected = _regex_selection(model, old, exclude)
            assert expected, name
            got = select_parameters(model, targets, exclude)
            assert list(got) == [n for n, _ in model.named_parameters() if n in expected], name


def test_default_targets_minilm_shape():
    config = _minilm_config()
    with torch.device("meta"):
        bare = BertModel(config, add_pooling_layer=True)  # how all-MiniLM-L6-v2 ships (no prefix)
        classifier = BertForSequenceClassification(config)
    assert set(select_parameters(bare, "encoder")) == _expected("", 6, BERT_LINEARS)
    selected = select_parameters(classifier, "encoder")
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


def test_encoder_in_a_list_is_a_regex_and_the_error_says_so():
    model = _tiny("bert")
    with pytest.raises(SelectionError) as info:
        require_parameters(model, ["encoder"])  # every encoder parameter, biases included
    assert "1-D tensor" in str(info.value) and "`targets: encoder` without brackets" in str(
        info.value
    )
    everything = select_parameters(model, ["encoder"], [r"bias$", "LayerNorm"])
    assert set(everything) == set(select_parameters(model, "encoder"))  # on BERT: the same set


def test_two_dimensional_non_default_targets_are_allowed():
    # Embeddings are not pruned by default, but a user may ask for them explicitly.
    model = _tiny("bert")
    program = _compile_gmp(model, targets=[r"word_embeddings\.weight$"])
    assert set(program.modifiers[0].targets) == {"bert.embeddings.word_embeddings.weight"}


def test_encoder_targets_on_an_unknown_architecture_say_so():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = torch.nn.Embedding(10, 8)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 5) for _ in range(2)])

    with pytest.raises(SelectionError, match="match no parameter") as info:
        require_parameters(Odd(), "encoder")
    assert "is not one recipec knows" in str(info.value) and "regexes" in str(info.value)
    assert set(require_parameters(Odd(), [r"layers\.\d+\.weight"])) == {
        "layers.0.weight",
        "layers.1.weight",
    }


def test_block_structures_need_divisible_input_dims():
    model = _tiny("bert")  # hidden 16, FFN 32: divisible by 4, not by 32
    assert len(require_parameters(model, "encoder", structure="block4")) == 12
    with pytest.raises(SelectionError, match="structure 1:32 needs 2-D weights"):
        require_parameters(model, "encoder", structure="1:32")


# --------------------------------------------------------------------------- recipe checks


def test_check_passes_the_default_on_every_family():
    for family in tiny_families.FAMILIES:
        model = tiny_families.model(family)
        check = check_targets(model, _recipe())
        assert check.error() is None, family
        assert check.selected[("main", 0)] == arch.default_target_names(model)
        assert check.dense == [] and check.excluded == []


def test_old_bert_regexes_leave_deberta_qkv_and_all_of_mpnet_dense():
    legacy = _recipe(targets=list(LEGACY_DEFAULT_TARGETS))
    deberta = check_targets(tiny_families.model("deberta-v2"), legacy)
    assert deberta.problems == []
    assert deberta.dense == [
        f"deberta.encoder.layer.{i}.attention.self.{p}_proj.weight"
        for i in range(2)
        for p in ("query", "key", "value")
    ]
    message = deberta.error()
    assert "6 encoder linear layer(s) of this deberta-v2 model would stay dense" in message
    assert "deberta.encoder.layer.{0-1}.attention.self.query_proj.weight" in message
    mpnet = check_targets(tiny_families.model("mpnet"), legacy)
    assert {n.split(".layer.")[1].split(".", 1)[1] for n in mpnet.dense} == {
        "attention.attn.q.weight",
        "attention.attn.k.weight",
        "attention.attn.v.weight",
        "attention.attn.o.weight",
    }
    for family in ("modernbert", "albert"):  # nothing matches: a problem and every linear dense
        check = check_targets(tiny_families.model(family), legacy)
        assert len(check.problems) == 1 and "match no parameter" in check.problems[0]
        assert check.dense == arch.default_target_names(tiny_families.model(family))


def test_an_exclude_makes_leaving_layers_dense_explicit():
    model = tiny_families.model("deberta-v2")
    check = check_targets(model, _recipe(exclude=[r"layer\.1\.attention"]))
    assert check.error() is None and check.dense == []
    assert check.excluded == [
        f"deberta.encoder.layer.1.attention.{p}.weight"
        for p in ("self.query_proj", "self.key_proj", "self.value_proj", "output.dense")
    ]


def test_the_union_of_the_pruning_modifiers_counts():
    def gmp(targets):
        return {
            "type": "gmp",
            "final_sparsity": 0.5,
            "start_step": 0,
            "end_step": 0,
            "targets": targets,
        }

    model = tiny_families.model("modernbert")
    both = _recipe(
        modifiers=[gmp([r"\.attn\."]), {**gmp([r"\.mlp\."]), "start_step": 1, "end_step": 1}]
    )
    check = check_targets(model, both)
    assert check.error() is None and len(check.stage_names("main")) == 8
    only_attention = check_targets(model, _recipe(modifiers=[gmp([r"\.attn\."])]))
    assert [n.rsplit(".", 2)[-2] for n in only_attention.dense] == ["Wi", "Wo"] * 2


def test_recipes_without_pruning_and_unknown_families_are_not_checked():
    dense_only = _recipe(modifiers=[{"type": "lr", "init_lr": 1e-3}])
    check = check_targets(tiny_families.model("bert"), dense_only)
    assert check.selected == {} and check.error() is None

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    check = check_targets(Toy(), _recipe(targets=[r"layers\.0\.weight"]))
    assert check.family is None and check.error() is None


def test_a_structure_that_does_not_divide_is_reported_early():
    model = tiny_families.model("bert")  # FFN 128, hidden 64: 1:3 divides neither
    recipe = _recipe(
        modifiers=[
            {"type": "gmp", "final_sparsity": 2 / 3, "start_step": 0, "structure": "1:3"},
        ]
    )
    (problem,) = check_targets(model, recipe).problems
    assert "gmp modifier [0]: structure 1:3 needs 2-D weights" in problem


def test_layer_rows_of_fused_tensors():
    model = tiny_families.model("modernbert")
    rows = layer_rows(model, arch.default_target_names(model))
    assert set(rows) == {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("attn.Wqkv", "mlp.Wi")
    }
    q, k, v = rows["model.layers.0.attn.Wqkv.weight"]
    assert torch.equal(torch.cat([q, k, v]), torch.arange(192))
    gate, up = rows["model.layers.0.mlp.Wi.weight"]
    assert (len(gate), len(up)) == (128, 128)
    deberta = tiny_families.model("deberta")
    (q, k, v) = layer_rows(deberta, ["deberta.encoder.layer.0.attention.self.in_proj.weight"])[
        "deberta.encoder.layer.0.attention.self.in_proj.weight"
    ]
    assert q[:17].tolist() == list(range(16)) + [48]  # per head: 16 rows of Q, then K, then V
    assert layer_rows(_tiny("bert"), select_parameters(_tiny("bert"), "encoder")) == {}


def test_grouped_names():
    assert grouped_names(["a.0.w", "a.1.w", "a.3.w", "b.w"]) == ["a.{0-1,3}.w", "b.w"]
    assert grouped_names(["a.0.w", "a.1.w"], {"a.0.w": (2,), "a.1.w": (3,)}) == [
        "a.0.w [2]",
        "a.1.w [3]",
    ]


# --------------------------------------------------------------------------- costs


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


@pytest.mark.parametrize("family", list(tiny_families.FAMILIES))
def test_cost_table_names_every_component_of_every_family(family):
    model = tiny_families.model(family)
    targets = select_parameters(model, "encoder")
    table = cost_table(model, seq_len=16, targets=targets)
    rows, total_params, _ = _shares(table)
    assert "other" not in rows and total_params == sum(p.numel() for p in model.parameters())
    assert sum(c.pruned_params for c in table) == sum(p.numel() for p in targets.values())
    assert {c.component for c in table if c.pruned_params} == {
        "attention.qkv",
        "attention.output",
        "ffn.in",
        "ffn.out",
    }


def test_cost_table_bert_base_at_seq_128():
    config = BertConfig()  # BERT-base: 12 layers, hidden 768, FFN 3072, vocab 30522
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    targets = set(select_parameters(model, "encoder"))
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


def test_albert_costs_per_use_in_the_table():
    albert = tiny_families.model("albert")  # one shared layer run 3 times
    bert = BertForSequenceClassification(tiny_families.config("bert", num_hidden_layers=3))
    by_albert = {c.component: c for c in cost_table(albert, 16)}
    by_bert = {c.component: c for c in cost_table(bert, 16)}
    for component in ("attention.qkv", "attention.scores", "attention.output", "ffn.in"):
        assert by_albert[component].flops == by_bert[component].flops
    assert by_albert["ffn.in"].params * 3 == by_bert["ffn.in"].params

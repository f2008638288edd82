"""Structured groups, whole-group masks, selection and saliencies (recipec.sparsity.structured),
and shrinking per family (recipec.sparsity.shrink): the shrunk model computes what the masked
model computes, reloads through recipec, exports to ONNX, and a stock from_pretrained refuses."""

from __future__ import annotations

import copy
import io
import tempfile
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from test_architectures import _config

from recipec.architectures import encoder_blocks
from recipec.sparsity.fisher import BlockFisherInverse
from recipec.sparsity.masks import apply_masks_
from recipec.sparsity.shrink import (
    STRUCTURE_KEY,
    apply_record_,
    drop_layers_,
    keep_from_masks,
    read_record,
    shrink_,
    slice_tensors,
)
from recipec.sparsity.structured import (
    StructureError,
    fisher_group_scores,
    group_masks,
    group_sets,
    kept_groups,
    magnitude_group_scores,
    removable_groups,
    removed_weights,
    select_groups,
)

FAMILIES = [
    "bert",
    "roberta",
    "distilbert",
    "deberta-v2",
    "deberta",
    "mpnet",
    "albert",
    "modernbert",
]
"""Every family the test matrix has one tiny config of (ELECTRA, XLM-R, CamemBERT share BERT's
code); DeBERTa-v2 is DeBERTa-v3's settings (shared attention keys)."""

IDS = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, 6:] = 0


def _model(family: str, layers: int | None = None, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = _config(family)
    config.initializer_range = 0.3  # large weights: a wrong computation shows in the logits
    if layers is not None:
        config.num_hidden_layers = layers
        if family == "modernbert":
            config.layer_types = None
            config = tf.ModernBertConfig(**{**config.to_dict(), "layer_types": None})
    for key, value in overrides.items():
        setattr(config, key, value)
    model = tf.AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():  # biases start at zero: random ones show a wrongly sliced bias
        for name, p in model.named_parameters():
            if "bias" in name.rpartition(".")[2]:  # DeBERTa: q_bias, v_bias too
                p.normal_(0.0, 0.3)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _params(model) -> dict:
    return dict(model.named_parameters())


def _masked(model, keep: dict) -> dict:
    """Whole-group masks for ``keep`` (set key -> kept), applied to ``model``; returns them."""
    params = _params(model)
    masks = {}
    for kind in ("heads", "neurons"):
        sets = [gs for gs in group_sets(model, kind) if gs.key in keep]
        masks.update(group_masks(sets, keep, params))
    apply_masks_(params, masks)
    return masks


def _some_keep(model) -> dict:
    """Half the heads and a third of the FFN neurons of every layer, by magnitude."""
    params = _params(model)
    keep = {}
    for kind, sparsity in (("heads", 0.5), ("neurons", 1 / 3)):
        sets = group_sets(model, kind)
        keep.update(select_groups(magnitude_group_scores(sets, params), sparsity, "per_layer"))
    return keep


# --------------------------------------------------------------------------- groups, masks


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_cover_every_target_weight_once(family):
    model = _model(family)
    params = _params(model)
    for kind in ("heads", "neurons"):
        for gs in group_sets(model, kind):
            seen: dict[str, torch.Tensor] = {}
            for s in gs.targets():
                p = params[s.param]
                count = seen.setdefault(s.param, torch.zeros(p.shape, dtype=torch.long))
                assert s.index.shape[0] == gs.count
                if s.axis == 0:
                    count[s.index.reshape(-1)] += 1
                else:
                    count[:, s.index.reshape(-1)] += 1
            for name, count in seen.items():
                assert bool((count == 1).all()), f"{name}: not every element in one group"


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_are_whole_groups_and_never_split_a_head(family):
    model = _model(family)
    params = _params(model)
    sets = group_sets(model, "heads")
    generator = torch.Generator().manual_seed(1)
    keep = {gs.key: torch.rand(gs.count, generator=generator) > 0.5 for gs in sets}
    for gs in sets:
        keep[gs.key][0] = True
    masks = group_masks(sets, keep, params)
    for gs in sets:
        assert torch.equal(kept_groups(gs, masks), keep[gs.key])
        for s in gs.targets():
            for h in range(gs.count):
                sel = masks[s.param].index_select(s.axis, s.index[h])
                assert bool(sel.all()) if keep[gs.key][h] else not bool(sel.any())
    # Every False of the masks lies in a removed head: nothing else is touched.
    removed = removed_weights(model, masks)
    for name, mask in masks.items():
        assert torch.equal(~mask, removed.get(name, torch.zeros_like(mask)))


def test_fused_qkv_and_glu_groups_follow_the_layouts():
    model = _model("modernbert")
    (heads, *_), (neurons, *_) = group_sets(model, "heads"), group_sets(model, "neurons")
    qkv = [s for s in heads.slices if s.param.endswith("Wqkv.weight")]
    assert [s.index[1].tolist()[:2] for s in qkv] == [[16, 17], [80, 81], [144, 145]]
    glu = [s for s in neurons.slices if s.param.endswith("Wi.weight")]
    assert [s.index[3].tolist() for s in glu] == [[3], [131]]
    deberta = group_sets(_model("deberta"), "heads")[0]
    in_proj = [s for s in deberta.slices if s.param.endswith("in_proj.weight")]
    assert [s.index[1].tolist()[:2] for s in in_proj] == [[48, 49], [64, 65], [80, 81]]
    assert {s.param.rpartition(".")[2] for s in deberta.slices if not s.target} >= {
        "q_bias",
        "v_bias",
    }


def test_talking_heads_and_unknown_layers_are_refused():
    with pytest.raises(StructureError, match="talking heads"):
        group_sets(_model("deberta", talking_head=True), "heads")
    with pytest.raises(StructureError, match=r"layers \[7\]"):
        group_sets(_model("bert"), "heads", layers=[7])


# --------------------------------------------------------------------------- selection


def test_select_per_layer_and_global_with_protected_minimum():
    scores = {"a": torch.tensor([5.0, 1.0, 3.0, 2.0]), "b": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    per_layer = select_groups(scores, 0.5, "per_layer")
    assert per_layer["a"].tolist() == [True, False, True, False]
    assert per_layer["b"].tolist() == [False, False, True, True]
    glob = select_groups(scores, 0.5, "global", min_keep=1)
    assert glob["b"].tolist() == [False, False, False, True]  # its best head is protected
    assert int(glob["a"].sum()) + int(glob["b"].sum()) == 4
    prev = {"a": torch.tensor([True, True, True, False]), "b": torch.ones(4, dtype=torch.bool)}
    again = select_groups(scores, 0.25, "per_layer", prev)
    assert again["a"].tolist() == [True, True, True, False]  # removed stays removed, counts
    with pytest.raises(StructureError, match="at least 1"):
        select_groups(scores, 0.99, "per_layer")
    with pytest.raises(StructureError, match="fewer than 1"):
        select_groups(scores, 0.9, "global")


def test_magnitude_is_the_l2_norm_of_the_whole_group():
    model = _model("bert")
    params = _params(model)
    (gs, *_) = group_sets(model, "heads")
    scores = magnitude_group_scores([gs], params)[gs.key]
    d = gs.width
    pre = "bert.encoder.layer.0.attention."
    expected = sum(
        float((params[pre + n].detach()[d : 2 * d] ** 2).sum())
        for n in ("self.query.weight", "self.key.weight", "self.value.weight")
    ) + float((params[pre + "output.dense.weight"].detach()[:, d : 2 * d] ** 2).sum())
    assert float(scores[1]) == pytest.approx(expected**0.5, rel=1e-6)


def test_fisher_saliency_matches_the_dense_block_formula():
    """rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q with the full block-diagonal F^-1 of every tensor
    (built here as one dense matrix), summed over the tensors the group spans."""
    model = _model("bert")
    params = _params(model)
    sets = group_sets(model, "neurons", layers=[0]) + group_sets(model, "heads", layers=[1])
    targets = {s.param: params[s.param] for gs in sets for s in gs.targets()}
    generator = torch.Generator().manual_seed(3)
    grads = [
        {n: torch.randn(p.shape, generator=generator) for n, p in targets.items()} for _ in range(6)
    ]
    calls = iter(grads)
    block = 24
    got = fisher_group_scores(
        sets, targets, lambda: next(calls), num_grads=6, block_size=block, damp=1e-2
    )
    for gs in sets:
        expected = torch.zeros(gs.count, dtype=torch.float64)
        for name in {s.param for s in gs.targets()}:
            columns = any(s.axis == 1 for s in gs.targets() if s.param == name)

            def flat(t, columns=columns):
                return (t.t() if columns else t).reshape(-1).double()

            finv = BlockFisherInverse(targets[name].numel(), block, 1e-2, 6, dtype=torch.float64)
            for g in grads:
                finv.update(flat(g[name]))
            n = targets[name].numel()
            dense = torch.block_diag(*finv.blocks)[:n, :n]
            labels = torch.full(targets[name].shape, -1, dtype=torch.long)
            for s in gs.targets():
                if s.param != name:
                    continue
                for h in range(gs.count):
                    if s.axis == 0:
                        labels[s.index[h]] = h
                    else:
                        labels[:, s.index[h]] = h
            labels, w = flat(labels).long(), flat(targets[name].detach())
            for h in range(gs.count):
                q = torch.nonzero(labels == h).reshape(-1)
                expected[h] += 0.5 * w[q] @ torch.linalg.solve(dense[q][:, q], w[q])
        assert torch.allclose(got[gs.key], expected, rtol=2e-3), gs.key


# --------------------------------------------------------------------------- shrink


@pytest.mark.parametrize("family", FAMILIES)
def test_shrunk_model_computes_the_masked_model(family):
    model = _model(family)
    keep = _some_keep(model)
    masks = _masked(model, keep)
    want = _logits(model)
    shrunk = copy.deepcopy(model)
    found = keep_from_masks(shrunk, masks)
    assert set(found) == {k for k, v in keep.items() if not v.all()}
    index_map = shrink_(shrunk, found)
    assert _rel(_logits(shrunk), want) < 1e-5
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    sliced = slice_tensors(masks, index_map)
    params = _params(shrunk)
    assert all(bool(m.all()) for m in sliced.values())  # only whole groups were pruned
    assert all(sliced[n].shape == params[n].shape for n in sliced)
    record = read_record(shrunk)
    for key, kept in keep.items():
        kind, layer = key.split(":")
        entry = record["layers"][layer]
        if kind == "heads":
            assert entry["heads"] == torch.nonzero(kept).reshape(-1).tolist()
        else:
            assert entry["intermediate_size"] == int(kept.sum())


def test_deberta_v2_without_shared_keys_shrinks_its_position_projections():
    model = _model("deberta-v2", share_att_key=False)
    keep = _some_keep(model)
    _masked(model, keep)
    want = _logits(model)
    shrink_(model, {k: v for k, v in keep.items() if not v.all()})
    attention = model.deberta.encoder.layer[0].attention.self
    assert attention.pos_key_proj.out_features == attention.all_head_size == 32
    assert _rel(_logits(model), want) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_unstructured_pruning_on_top_survives_the_shrink(family):
    model = _model(family)
    keep = _some_keep(model)
    masks = _masked(model, keep)
    generator = torch.Generator().manual_seed(5)
    params = _params(model)
    for name in masks:
        masks[name] &= torch.rand(params[name].shape, generator=generator) > 0.5
    apply_masks_(params, masks)
    want = _logits(model)
    shrunk = copy.deepcopy(model)
    index_map = shrink_(shrunk, keep_from_masks(shrunk, masks))
    assert _rel(_logits(shrunk), want) < 1e-5
    sliced = slice_tensors(masks, index_map)
    for name, mask in sliced.items():
        assert torch.equal(_params(shrunk)[name] == 0, ~mask | (_params(shrunk)[name] == 0))


def test_a_layer_whose_every_head_is_removable_keeps_one_with_zero_output():
    model = _model("mpnet")
    (gs, *_) = group_sets(model, "heads")
    masks = _masked(model, {gs.key: torch.zeros(gs.count, dtype=torch.bool)})
    assert removable_groups(gs, masks).all()
    want = _logits(model)
    keep = keep_from_masks(model, masks)
    assert keep[gs.key].tolist() == [True, False, False, False]
    shrink_(model, keep)
    assert _rel(_logits(model), want) < 1e-5
    with pytest.raises(StructureError, match="every group"):
        shrink_(model, {"neurons:0": torch.zeros(128, dtype=torch.bool)})


def _bypass(model, drop: set[int]) -> None:
    """The reference for a dropped layer: the block returns its input (what dropping means)."""
    for block in encoder_blocks(model):
        if block.layer in drop:

            def hook(module, args, kwargs, out):
                hidden = args[0] if args else kwargs["hidden_states"]
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

            block.module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "albert"])
def test_dropping_layers_equals_skipping_them_and_mixes_with_heads(family):
    model = _model(family, layers=4)
    reference = copy.deepcopy(model)
    _bypass(reference, {1, 2})
    (last_heads,) = group_sets(reference, "heads", layers=[3])
    kept = torch.tensor([True, True, False, True])
    _masked(reference, {last_heads.key: kept})
    renamed = drop_layers_(model, [0, 3])
    assert model.config.num_hidden_layers == 2
    assert renamed and all(".3." in old and ".1." in new for old, new in renamed.items())
    shrink_(model, {"heads:1": kept})
    assert _rel(_logits(model), _logits(reference)) < 1e-5
    record = read_record(model)
    assert record["source_layers"] == [0, 3] and record["source_num_layers"] == 4
    assert drop_layers_(model, [0, 3]) == {}  # idempotent
    with pytest.raises(StructureError, match="not in the model"):
        drop_layers_(model, [1])


def test_layer_drop_refusals_and_albert():
    with pytest.raises(StructureError, match="keep layer 0"):
        drop_layers_(_model("modernbert", layers=4), [1, 2])
    albert = _model("albert")
    reference = copy.deepcopy(albert)
    reference.config.num_hidden_layers = 2
    drop_layers_(albert, [0, 2])
    assert albert.config.num_hidden_layers == 2
    assert _rel(_logits(albert), _logits(reference)) < 1e-6
    grouped = _model("albert", num_hidden_groups=3, num_hidden_layers=3)
    with pytest.raises(StructureError, match="several layer groups"):
        drop_layers_(grouped, [0, 1])


def test_modernbert_layer_types_follow_the_kept_layers():
    model = _model("modernbert", layers=4)
    assert model.config.layer_types == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    drop_layers_(model, [0, 2, 3])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]


# --------------------------------------------------------------------------- reload, ONNX


def _export_onnx(model) -> bytes:
    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return self.inner(input_ids=ids, attention_mask=mask).logits

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model).eval(),
            (IDS, MASK),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["ids", "mask"],
            output_names=["logits"],
            dynamic_axes={"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}},
        )
    return buffer.getvalue()


@pytest.mark.parametrize("family", FAMILIES)
def test_shrunk_folder_reloads_through_recipec_and_a_stock_load_fails(family):
    import onnxruntime as ort

    from recipec.models import is_shrunk, load_model

    model = _model(family)
    shrink_(model, {k: v for k, v in _some_keep(model).items() if not v.all()})
    want = _logits(model)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = tf.AutoConfig.from_pretrained(folder)
        assert is_shrunk(config) and getattr(config, STRUCTURE_KEY)["layers"]
        with pytest.raises(RuntimeError, match="mismatched|size"):
            tf.AutoModelForSequenceClassification.from_pretrained(folder)
        loaded = load_model(folder, head="sequence-classification").model
    assert torch.equal(_logits(loaded), want)
    session = ort.InferenceSession(_export_onnx(loaded))
    got = session.run(None, {"ids": IDS.numpy(), "mask": MASK.numpy()})[0]
    assert np.abs(got - want.numpy()).max() < 1e-4


def test_a_record_applied_to_a_stock_model_gives_the_shrunk_shapes():
    model = _model("mpnet")
    shrink_(model, {k: v for k, v in _some_keep(model).items() if not v.all()})
    stock = tf.AutoModelForSequenceClassification.from_config(copy.deepcopy(model.config))
    apply_record_(stock)
    assert {n: p.shape for n, p in stock.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }
    att = stock.mpnet.encoder.layer[0].attention.attn
    assert att.recipec_kept_heads.tolist() == read_record(model)["layers"]["0"]["heads"]


def test_the_record_keeps_the_original_sizes_when_removed_heads_break_the_head_width():
    """6 heads of width 8: without one head the attention is 40 wide, not a multiple of 6."""
    model = _model("bert", hidden_size=48, num_attention_heads=6, intermediate_size=96)
    keep = {
        "heads:0": torch.tensor([True, True, False, True, True, True]),
        "neurons:1": torch.arange(96) % 3 != 0,
    }
    _masked(model, keep)
    want = _logits(model)
    shrink_(model, keep)
    assert _rel(_logits(model), want) < 1e-5
    record = read_record(model)
    assert (record["num_attention_heads"], record["intermediate_size"]) == (6, 96)
    assert record["layers"]["0"] == {"heads": [0, 1, 3, 4, 5]}
    assert record["layers"]["1"] == {"intermediate_size": 64}

"""Every structure and scope on fused tensors (ModernBERT ``Wqkv`` / GLU ``Wi``, DeBERTa v1
``in_proj``) and on ALBERT's shared layer, through compiled recipes."""

from __future__ import annotations

import pytest
import tiny_families
import torch
import yaml

import recipec
from recipec import architectures as arch
from recipec.recipe.load import load_recipe_text
from recipec.sparsity.masks import count_pruned


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compile(model, modifier: dict, grad_batches=None):
    recipe = load_recipe_text(
        yaml.safe_dump(
            {
                "training": {"steps": 0},
                "modifiers": [{"start_step": 0, **modifier}],
            }
        )
    )
    return recipec.compile(recipe, model, None, steps_per_epoch=1, grad_batches=grad_batches)


def _prune(model, modifier: dict, grad_batches=None):
    program = _compile(model, modifier, grad_batches)
    program.step_start(0)
    program.finalize()
    return program


def _fused_infos(model):
    return [i for i in arch.encoder_linears(model) if len(i.slices) > 1]


def _groups_whole(mask: torch.Tensor, group: int) -> bool:
    groups = mask.reshape(mask.shape[0], -1, group)
    return bool((groups.all(-1) | ~groups.any(-1)).all())


@pytest.mark.parametrize("family", ["modernbert", "deberta"])
def test_block4_per_layer_prunes_each_part_exactly_and_no_group_straddles(family):
    model = tiny_families.model(family)
    program = _prune(
        model, {"type": "gmp", "final_sparsity": 0.5, "structure": "block4", "scope": "per_layer"}
    )
    masks = program.masks.masks
    assert set(masks) == set(arch.default_target_names(model))
    fused = _fused_infos(model)
    assert fused
    for info in fused:
        mask = masks[info.param_name]
        assert _groups_whole(mask, 4)  # groups run along the input dim inside one row
        for part, rows in info.parts().items():  # Q, K, V (gate, up): half of each one's groups
            groups = len(rows) * info.in_features // 4
            assert count_pruned(mask[rows]) == 4 * round(0.5 * groups), (info.param_name, part)
    for name, mask in masks.items():
        if name not in {i.param_name for i in fused}:
            assert count_pruned(mask) == round(0.5 * mask.numel())


def test_unstructured_and_nm_on_fused_tensors():
    model = tiny_families.model("modernbert")
    total = sum(
        p.numel() for n, p in model.named_parameters() if n in arch.default_target_names(model)
    )
    program = _prune(model, {"type": "gmp", "final_sparsity": 0.8})
    assert sum(count_pruned(m) for m in program.masks.masks.values()) == round(0.8 * total)
    model = tiny_families.model("modernbert")
    program = _prune(model, {"type": "gmp", "final_sparsity": 0.5, "structure": "2:4"})
    for mask in program.masks.masks.values():
        assert (mask.reshape(-1, 4).sum(-1) == 2).all()


def test_global_scope_ranks_fused_tensors_as_one_pool():
    """Global scope is unchanged: Q, K and V compete with every other weight."""
    model = tiny_families.model("modernbert")
    qkv = model.model.layers[0].attn.Wqkv.weight
    with torch.no_grad():
        qkv[: qkv.shape[0] // 3] *= 1e-3  # a tiny Q: a global ranking prunes it first
    program = _prune(model, {"type": "gmp", "final_sparsity": 0.2})
    info = _fused_infos(model)[0]
    mask = program.masks.masks[info.param_name]
    assert count_pruned(mask[info.rows("q")]) == info.rows("q").numel() * info.in_features
    per_layer = tiny_families.model("modernbert")
    with torch.no_grad():
        per_layer.model.layers[0].attn.Wqkv.weight[: qkv.shape[0] // 3] *= 1e-3
    program = _prune(per_layer, {"type": "gmp", "final_sparsity": 0.2, "scope": "per_layer"})
    mask = program.masks.masks[info.param_name]
    for rows in info.parts().values():
        assert count_pruned(mask[rows]) == round(0.2 * rows.numel() * info.in_features)


class _Batches:
    """``grad_batches(batch_size)``: seeded random sequence-classification batches."""

    def __call__(self, batch_size: int):
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            yield {
                "input_ids": torch.randint(5, 99, (batch_size, 12), generator=g),
                "attention_mask": torch.ones(batch_size, 12, dtype=torch.long),
                "labels": torch.randint(0, 2, (batch_size,), generator=g),
            }


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "modernbert", "deberta"])
@pytest.mark.parametrize("structure, scope", [("unstructured", "per_layer"), ("block4", "global")])
def test_obert_fisher_blocks_on_every_layout(family, structure, scope):
    model = tiny_families.model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = {
        "type": "obert",
        "final_sparsity": 0.6,
        "structure": structure,
        "scope": scope,
        "num_grads": 4,
        "grad_batch_size": 2,
        "fisher_block_size": 24,  # spans rows: Fisher blocks cross the Q/K/V boundaries
        "damp": 1e-3,
    }
    program = _prune(model, spec, grad_batches=_Batches())
    masks = program.masks.masks
    names = arch.default_target_names(model)
    assert list(masks) == names
    params = dict(model.named_parameters())
    group = 4 if structure == "block4" else 1
    total = sum(m.numel() for m in masks.values())
    if scope == "global":
        assert sum(count_pruned(m) for m in masks.values()) == group * round(0.6 * total / group)
    layers = {i.param_name: i.parts() for i in arch.encoder_linears(model)}
    for name, mask in masks.items():
        assert torch.equal(params[name] == 0, ~mask)  # exact zeros, kept weights moved by OBS
        assert _groups_whole(mask, group)
        if scope == "per_layer":
            for rows in layers[name].values():
                assert count_pruned(mask[rows]) == round(0.6 * mask[rows].numel())
    for name, param in model.named_parameters():
        if name not in masks:
            assert torch.equal(param, before[name]), name  # embeddings, heads, norms untouched


def test_albert_shared_layer_is_pruned_once_and_counted_once():
    model = tiny_families.model("albert")  # one layer, run 3 times
    program = _prune(model, {"type": "gmp", "final_sparsity": 0.8})
    masks = program.masks.masks
    assert len(masks) == 6 and all(".albert_layer_groups.0.albert_layers.0." in n for n in masks)
    total = sum(m.numel() for m in masks.values())
    assert sum(count_pruned(m) for m in masks.values()) == round(0.8 * total)
    assert program.sparsity()[0] == pytest.approx(0.8, abs=1e-4)
    infos = {i.param_name: i for i in arch.encoder_linears(model)}
    assert {infos[n].uses for n in masks} == {3}
    layer = model.albert.encoder.albert_layer_groups[0].albert_layers[0]
    seen = []
    handle = layer.attention.query.register_forward_hook(
        lambda m, i, o: seen.append(bool((m.weight == 0).float().mean() > 0.7))
    )
    with torch.no_grad():
        model(torch.randint(5, 99, (1, 6)))
    handle.remove()
    assert seen == [True, True, True]  # every use runs the one pruned tensor


def test_cram_per_layer_ranks_the_layers_of_fused_tensors():
    model = tiny_families.model("modernbert")
    recipe = load_recipe_text(
        yaml.safe_dump(
            {
                "training": {"steps": 2},
                "modifiers": [{"type": "cram", "sparsities": [0.5], "scope": "per_layer"}],
            }
        )
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    program = recipec.compile(recipe, model, optimizer, steps_per_epoch=2)
    (cram,) = program.modifiers
    assert set(cram.layer_rows) == {i.param_name for i in _fused_infos(model)}

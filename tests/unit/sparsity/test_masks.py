"""Tests for recipec.sparsity.masks: structures, exact-count masks, monotonicity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipec.recipe.structure import MAX_NM_GROUP, Structure, parse_structure
from recipec.sparsity.masks import (
    apply_masks_,
    compute_masks,
    count_pruned,
    count_zeros,
    group_scores,
    magnitude_scores,
    mask_sparsity,
    sparsity_table,
    weight_sparsity,
    zero_pruned_,
)

T = torch.tensor


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------------- structures


@pytest.mark.parametrize(
    "text, expected",
    [
        ("unstructured", Structure("unstructured")),
        ("block4", Structure("block", block=4)),
        ("block2", Structure("block", block=2)),
        ("block16", Structure("block", block=16)),
        ("2:4", Structure("nm", n=2, m=4)),
        ("1:8", Structure("nm", n=1, m=8)),
    ],
)
def test_parse_structure_valid(text, expected):
    s = parse_structure(text)
    assert s == expected
    assert str(s) == text
    assert parse_structure(s) is s


@pytest.mark.parametrize(
    "text", ["", "dense", "block", "block1", "block0", "blockx", "4:4", "0:4", "5:4", "2:", "2/4"]
)
def test_parse_structure_invalid(text):
    with pytest.raises(ValueError, match="structure"):
        parse_structure(text)


def test_structure_bounds_are_the_recipe_schema_bounds():
    """One grammar: what a recipe accepts is what the mask code and the converter accept."""
    from pydantic import ValidationError

    from recipec.recipe.schema import GMPSpec

    assert parse_structure(f"1:{MAX_NM_GROUP}") == Structure("nm", n=1, m=MAX_NM_GROUP)
    for bad in (f"1:{MAX_NM_GROUP + 1}", "block1", " block4", "block4\n", "2:4 "):
        with pytest.raises(ValueError, match="structure"):
            parse_structure(bad)
        with pytest.raises(ValidationError, match="structure"):
            GMPSpec(type="gmp", final_sparsity=0.5, structure=bad)
    with pytest.raises(ValueError):
        Structure("nm", n=1, m=MAX_NM_GROUP + 1)
    assert GMPSpec(type="gmp", final_sparsity=0.5, structure="2:4").nm_sparsity() == 0.5
    assert GMPSpec(type="gmp", final_sparsity=0.5, structure="block8").group_size == 8


def test_structure_group_sizes():
    assert parse_structure("unstructured").group == 1
    assert parse_structure("block4").group == 4
    assert parse_structure("2:4").group == 4
    with pytest.raises(ValueError):
        Structure("block", block=1)
    with pytest.raises(ValueError):
        Structure("nm", n=3, m=2)
    with pytest.raises(ValueError):
        Structure("weird")


def test_group_scores_sums_along_last_dim():
    s = torch.arange(16.0).reshape(2, 8)
    g = group_scores(s, "block4")
    assert torch.equal(g, T([[0 + 1 + 2 + 3, 4 + 5 + 6 + 7], [8 + 9 + 10 + 11, 12 + 13 + 14 + 15]]))
    assert group_scores(s, "unstructured") is s
    with pytest.raises(ValueError, match="'layer.w'.*not divisible"):
        group_scores(torch.ones(3, 6), "block4", name="layer.w")


# ---------------------------------------------------------------------------- exact masks


def test_unstructured_per_layer_exact():
    s = T([[5.0, 1.0, 7.0, 3.0], [2.0, 8.0, 4.0, 6.0]])
    m = compute_masks({"w": s}, 0.5, "unstructured", "per_layer")["w"]
    assert torch.equal(m, B([[True, False, True, False], [False, True, False, True]]))
    m = compute_masks({"w": s}, 0.25, "unstructured", "per_layer")["w"]
    assert torch.equal(m, B([[True, False, True, True], [False, True, True, True]]))
    assert torch.equal(compute_masks({"w": s}, 0.0, "unstructured")["w"], torch.ones(2, 4).bool())
    assert not compute_masks({"w": s}, 1.0, "unstructured")["w"].any()


def test_block4_exact():
    # groups (rows of 8 split in two): sums 10, 2, 26, 4  ->  50% prunes sums 2 and 4.
    s = T([[1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5], [9.0, 9.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0]])
    m = compute_masks({"w": s}, 0.5, "block4", "per_layer")["w"]
    assert torch.equal(m, B([[True] * 4 + [False] * 4, [True] * 4 + [False] * 4]))
    # element-wise magnitude would have pruned other weights: block selection is by group sum
    mu = compute_masks({"w": s}, 0.5, "unstructured", "per_layer")["w"]
    assert not torch.equal(m, mu)
    # 25% of 4 groups = 1 group: the one with sum 2
    m = compute_masks({"w": s}, 0.25, "block4", "global")["w"]
    assert torch.equal(m, B([[True] * 4 + [False] * 4, [True] * 8]))


def test_block4_grouped_scores_equivalent():
    torch.manual_seed(0)
    s = torch.rand(6, 16)
    a = compute_masks({"w": s}, 0.5, "block4", "per_layer")["w"]
    b = compute_masks({"w": group_scores(s, "block4")}, 0.5, "block4", "per_layer", grouped=True)
    assert torch.equal(a, b["w"])
    assert b["w"].shape == (6, 16)


def test_nm_2_4_exact():
    s = T([[1.0, 4.0, 3.0, 2.0, -1.0, -5.0, 0.0, 7.0], [5.0, 5.0, 5.0, 5.0, 0.1, 0.3, 0.2, 0.4]])
    m = compute_masks({"w": s}, 0.5, "2:4")["w"]
    # ties: among equal scores the earlier weight is pruned first
    assert torch.equal(
        m,
        B(
            [
                [False, True, True, False, False, False, True, True],
                [False, False, True, True, False, True, False, True],
            ]
        ),
    )
    assert (m.reshape(-1, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="1 - N/M"):
        compute_masks({"w": s}, 0.6, "2:4")
    with pytest.raises(ValueError, match="not divisible"):
        compute_masks({"w": torch.ones(2, 6)}, 0.5, "2:4")


def _two_layers():
    return {
        "a": T([[1.0, 2.0, 3.0, 4.0]]),
        "b": T([[10.0, 40.0, 20.0, 30.0]]),
    }


def test_per_layer_and_global_differ_exactly():
    s = _two_layers()
    pl = compute_masks(s, 0.5, "unstructured", "per_layer")
    gl = compute_masks(s, 0.5, "unstructured", "global")
    assert torch.equal(pl["a"], B([[False, False, True, True]]))
    assert torch.equal(pl["b"], B([[False, True, False, True]]))
    assert torch.equal(gl["a"], B([[False, False, False, False]]))
    assert torch.equal(gl["b"], B([[True, True, True, True]]))


def test_per_layer_and_global_differ_block():
    s = {
        "a": T([[1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]]),
        "b": T([[9.0, 9.0, 9.0, 9.0, 3.0, 3.0, 3.0, 3.0]]),
    }
    pl = compute_masks(s, 0.5, "block4", "per_layer")
    gl = compute_masks(s, 0.5, "block4", "global")
    assert torch.equal(pl["a"], B([[False] * 4 + [True] * 4]))
    assert torch.equal(pl["b"], B([[True] * 4 + [False] * 4]))
    assert torch.equal(gl["a"], B([[False] * 8]))
    assert torch.equal(gl["b"], B([[True] * 8]))


def _fused():
    """A fused ``Wqkv``-like tensor: rows 0-1 are Q (small scores), 2-3 K, 4-5 V (large)."""
    return T(
        [
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5],
            [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0],
            [11.0, 21.0, 31.0, 41.0, 51.0, 61.0, 71.0, 81.0],
            [100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0],
            [101.0, 201.0, 301.0, 401.0, 501.0, 601.0, 701.0, 801.0],
        ]
    )


QKV_ROWS = {"w": (torch.arange(0, 2), torch.arange(2, 4), torch.arange(4, 6))}


@pytest.mark.parametrize("structure, group", [("unstructured", 1), ("block4", 4)])
def test_per_layer_ranks_each_layer_of_a_fused_tensor(structure, group):
    s = {"w": _fused()}
    whole = compute_masks(s, 0.5, structure, "per_layer")["w"]
    assert whole[:2].sum() == 0 and whole[4:].all()  # one ranking: Q loses everything
    parts = compute_masks(s, 0.5, structure, "per_layer", layer_rows=QKV_ROWS)["w"]
    for rows in QKV_ROWS["w"]:  # each of Q, K, V loses exactly half of its groups
        assert count_pruned(parts[rows]) == 8
        groups = parts[rows].reshape(-1, group)
        assert (groups.all(-1) | ~groups.any(-1)).all()  # whole groups, inside the part's rows
    assert torch.equal(parts[:, :4], torch.zeros(6, 4, dtype=torch.bool))  # the lower halves
    # global scope and N:M do not change with the layers of a fused tensor
    assert torch.equal(
        compute_masks(s, 0.5, structure, "global")["w"],
        compute_masks(s, 0.5, structure, "global", layer_rows=QKV_ROWS)["w"],
    )
    assert torch.equal(
        compute_masks(s, 0.5, "2:4")["w"], compute_masks(s, 0.5, "2:4", layer_rows=QKV_ROWS)["w"]
    )


def test_per_layer_parts_keep_previous_masks_and_interleaved_rows():
    s = {"w": _fused()}
    prev = torch.ones(6, 8, dtype=torch.bool)
    prev[4, 7] = False  # a large V weight already pruned stays pruned, and counts
    interleaved = {"w": (T([0, 3]).long(), T([1, 4]).long(), T([2, 5]).long())}
    m = compute_masks(s, 0.25, "unstructured", "per_layer", {"w": prev}, layer_rows=interleaved)
    assert not m["w"][4, 7]
    for rows in interleaved["w"]:
        assert count_pruned(m["w"][rows]) == 4


def test_layer_rows_must_cover_every_row_once():
    s = {"w": _fused()}
    for bad in ((torch.arange(0, 3),), (torch.arange(0, 4), torch.arange(3, 6))):
        with pytest.raises(ValueError, match="must cover its 6 rows once each"):
            compute_masks(s, 0.5, "unstructured", "per_layer", layer_rows={"w": bad})
    with pytest.raises(ValueError, match="has no rows"):
        compute_masks(
            {"v": torch.ones(4)}, 0.5, "unstructured", "per_layer", layer_rows={"v": (T([0]),)}
        )


def test_global_ties_are_deterministic_in_dict_order():
    s = {"x": torch.ones(2, 3), "y": torch.ones(3)}
    m = compute_masks(s, 0.5, "unstructured", "global")  # 9 weights -> round(4.5) = 4 pruned
    assert torch.equal(m["x"], B([[False, False, False], [False, True, True]]))
    assert torch.equal(m["y"], B([True, True, True]))
    m2 = compute_masks(s, 0.5, "unstructured", "global")
    assert all(torch.equal(m[k], m2[k]) for k in m)


def test_rounding_counts():
    s = {"w": torch.arange(10.0)}
    for sp, k in [(0.3, 3), (0.25, 2), (0.35, 4), (0.99, 10), (0.04, 0)]:
        m = compute_masks(s, sp, "unstructured", "per_layer")["w"]
        assert int((~m).sum()) == int(round(sp * 10)) == k


# ---------------------------------------------------------------------------- monotonicity


def test_prev_masks_stay_pruned_unstructured():
    s = T([[9.0, 1.0, 7.0, 3.0, 2.0, 8.0, 4.0, 6.0]])
    prev = B([[False, True, True, True, True, True, True, True]])  # 9.0 already pruned
    m = compute_masks({"w": s}, 0.5, "unstructured", "per_layer", prev_masks={"w": prev})["w"]
    # 4 pruned in total: the already-pruned 9.0 plus the three lowest others (1, 2, 3)
    assert torch.equal(m, B([[False, False, True, False, False, True, True, True]]))
    assert not (m & ~prev).any()


def test_prev_masks_exceeding_target_are_kept_pruned():
    s = torch.arange(8.0)
    prev = torch.zeros(8, dtype=torch.bool)
    prev[:2] = True
    m = compute_masks({"w": s}, 0.25, "unstructured", "per_layer", prev_masks={"w": prev})["w"]
    assert torch.equal(m, prev)


def test_prev_partial_blocks_over_target_are_pruned_whole():
    s = torch.arange(16.0).reshape(2, 8)
    prev = torch.ones(2, 8, dtype=torch.bool)
    prev[0, 0] = prev[0, 5] = prev[1, 7] = False  # three partially pruned groups
    m = compute_masks({"w": s}, 0.25, "block4", "per_layer", prev_masks={"w": prev})["w"]
    assert torch.equal(m, B([[False] * 8, [True] * 4 + [False] * 4]))


def test_prev_masks_block_and_nm_monotone():
    torch.manual_seed(1)
    s = torch.rand(4, 8)
    prev = torch.ones(4, 8, dtype=torch.bool)
    prev[0, 1] = False  # partial group -> counts as pruned group
    prev[2, 4:] = False
    m = compute_masks({"w": s}, 0.5, "block4", "global", prev_masks={"w": prev})["w"]
    assert not (m & ~prev).any()
    assert not m[0, :4].any() and not m[2, 4:].any()
    assert int((~m).reshape(-1, 4).all(-1).sum()) == 4
    assert (m.reshape(-1, 4).all(-1) | ~m.reshape(-1, 4).any(-1)).all()  # all-or-nothing

    prev = torch.ones(2, 4, dtype=torch.bool)
    prev[0, 3] = False
    s = T([[1.0, 2.0, 3.0, 100.0], [4.0, 3.0, 2.0, 1.0]])
    m = compute_masks({"w": s}, 0.5, "2:4", prev_masks={"w": prev})["w"]
    assert torch.equal(m, B([[False, True, True, False], [True, True, False, False]]))


def test_monotone_over_a_schedule():
    torch.manual_seed(2)
    scores = {"a": torch.rand(8, 16), "b": torch.rand(4, 16)}
    prev = None
    for sp in [0.3, 0.5, 0.7, 0.9]:
        new_scores = {k: torch.rand_like(v) for k, v in scores.items()}  # scores change
        m = compute_masks(new_scores, sp, "block4", "global", prev_masks=prev)
        if prev is not None:
            assert all(not (m[k] & ~prev[k]).any() for k in m)
        total_groups = sum(v.numel() // 4 for v in m.values())
        pruned_groups = sum(int((~v).reshape(-1, 4).all(-1).sum()) for v in m.values())
        assert pruned_groups == round(sp * total_groups)
        prev = m


# ---------------------------------------------------------------------------- errors


def test_bad_arguments_raise():
    s = {"enc.w": torch.ones(2, 6)}
    with pytest.raises(ValueError, match="'enc.w'"):
        compute_masks(s, 0.5, "block4")
    with pytest.raises(ValueError, match="sparsity"):
        compute_masks(s, 1.5, "unstructured")
    with pytest.raises(ValueError, match="scope"):
        compute_masks(s, 0.5, "unstructured", "layer")
    with pytest.raises(ValueError, match="shape"):
        compute_masks(s, 0.5, "unstructured", prev_masks={"enc.w": torch.ones(6, 2).bool()})
    with pytest.raises(ValueError, match="NaN"):
        compute_masks({"w": T([1.0, float("nan")])}, 0.5, "unstructured")
    with pytest.raises(ValueError, match="scalar"):
        compute_masks({"w": T(1.0)}, 0.5, "block4")


# ---------------------------------------------------------------------------- helpers


def test_magnitude_apply_and_sparsity():
    p = {"w": T([[1.0, -3.0, 2.0, -0.5]]), "v": T([4.0, -1.0])}
    sc = magnitude_scores(p)
    assert torch.equal(sc["w"], T([[1.0, 3.0, 2.0, 0.5]]))
    m = compute_masks(sc, 0.5, "unstructured", "global")
    assert torch.equal(m["w"], B([[False, True, True, False]]))
    assert torch.equal(m["v"], B([True, False]))
    apply_masks_(p, m)
    assert torch.equal(p["w"], T([[0.0, -3.0, 2.0, 0.0]]))
    assert not torch.signbit(p["w"][0, 0])  # +0.0, exact zero
    overall, per = mask_sparsity(m)
    assert overall == 0.5 and per == {"w": 0.5, "v": 0.5}
    with pytest.raises(KeyError):
        apply_masks_(p, {"zz": torch.ones(1).bool()})
    with pytest.raises(ValueError):
        apply_masks_(p, {"v": torch.ones(3).bool()})


def test_zero_pruned_writes_exact_zeros_where_pruned():
    g = {"w": T([[-1.0, 2.0], [3.0, -4.0]])}
    zero_pruned_(g, {"w": B([[True, False], [False, True]])})
    assert torch.equal(g["w"], T([[0.0, 2.0], [3.0, 0.0]]))
    assert not torch.signbit(g["w"]).any()


def test_sparsity_is_counted_one_way():
    masks = {"w": B([[True, False, False, True]]), "v": B([False, True, True])}
    assert count_pruned(masks["w"]) == 2 and count_pruned(masks["v"]) == 1
    assert mask_sparsity(masks) == (3 / 7, {"w": 0.5, "v": 1 / 3})
    weights = {"w": T([[1.0, 0.0, -0.0, 2.0]]), "v": T([0.0, 5.0, 0.0])}
    assert count_zeros(weights["w"]) == 2  # -0.0 is a zero
    assert weight_sparsity(weights) == (4 / 7, {"w": 0.5, "v": 2 / 3})
    assert weight_sparsity(weights, ["v"]) == (2 / 3, {"v": 2 / 3})
    assert sparsity_table(masks)["v"] == {"shape": [3], "numel": 3, "zeros": 1, "sparsity": 1 / 3}
    assert mask_sparsity({}) == (0.0, {}) and weight_sparsity({}) == (0.0, {})


def test_large_tensor_exact_count():
    torch.manual_seed(3)
    scores = {"a": torch.randn(1024, 768).abs(), "b": torch.randn(3072, 768).abs()}
    scores["b"][:, :16] = 0.5  # many ties
    for scope in ("global", "per_layer"):
        m = compute_masks(scores, 0.9, "block4", scope)
        if scope == "global":
            total = sum(v.numel() // 4 for v in m.values())
            assert sum(int((~v).sum()) for v in m.values()) == 4 * round(0.9 * total)
        else:
            for v in m.values():
                assert int((~v).sum()) == 4 * round(0.9 * (v.numel() // 4))


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 1.0),
    scope=st.sampled_from(["global", "per_layer"]),
    block=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
def test_exact_counts_property(shapes, sparsity, scope, block, seed):
    g = torch.Generator().manual_seed(seed)
    structure = "unstructured" if block == 1 else f"block{block}"
    # integer-valued scores -> plenty of ties
    scores = {
        f"t{i}": torch.randint(0, 4, (r, c * block), generator=g).float()
        for i, (r, c) in enumerate(shapes)
    }
    prev = {k: torch.rand(v.shape, generator=g) > 0.2 for k, v in scores.items()}
    if block > 1:
        prev = {
            k: v.reshape(-1, block).all(-1, keepdim=True).expand(-1, block).reshape(scores[k].shape)
            for k, v in prev.items()
        }
    m = compute_masks(scores, sparsity, structure, scope, prev_masks=prev)
    pruned = {k: int((~v).sum()) // block for k, v in m.items()}
    prev_pruned = {k: int((~v).sum()) // block for k, v in prev.items()}
    groups = {k: v.numel() // block for k, v in m.items()}
    assert all(not (m[k] & ~prev[k]).any() for k in m)
    if scope == "per_layer":
        for k in m:
            assert pruned[k] == max(round(sparsity * groups[k]), prev_pruned[k])
    else:
        total = sum(groups.values())
        assert sum(pruned.values()) == max(round(sparsity * total), sum(prev_pruned.values()))

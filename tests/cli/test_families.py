"""The supported encoder families end to end, on tiny random models saved as a user's checkpoint
folders (``tests/tiny_families.py``): ``recipec plan --model`` finds the default targets, ``recipec
apply`` prunes exactly them (GMP to 80%, oBERT) leaving embeddings and heads untouched, and
``recipec export`` verifies the ONNX model; recipes that would leave encoder linear layers
silently dense are refused by plan and by apply before any training. The README's table of
supported architectures lists exactly these families.

Sequence classification runs in the default suite; multiple choice (the same code with a
``[batch, choices, seq]`` input) is marked slow except for three families.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny_families
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_families import CASES, FAMILIES

from recipec import architectures as arch
from recipec.cli import main

ROOT = Path(__file__).resolve().parents[2]

GMP_80 = """\
training: {steps: 0, batch_size: 8, max_seq_length: 32, seed: 1}
modifiers:
  - {type: gmp, final_sparsity: 0.8, start_step: 0}
"""
OBERT_80 = """\
training: {steps: 0, batch_size: 8, max_seq_length: 32, seed: 1}
modifiers:
  - {type: obert, final_sparsity: 0.8, start_step: 0, num_grads: 4, grad_batch_size: 4,
     fisher_block_size: 16, damp: 1e-4}
"""
# The default targets before `targets: encoder`: BERT names only.
BERT_REGEXES = r"""
targets: ['encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)\.weight$']
"""
# ModernBERT, ALBERT: 1 block layout per layer; 2 layers (ALBERT: one shared layer, 3 uses).
TARGETS_PER_LAYER = {"modernbert": 4, "deberta": 4}
LAYERS = {"albert": 1}
FAST_MC = {"bert", "deberta-v2", "modernbert"}


def _cases(fast_mc=FAST_MC):
    return [
        pytest.param(f, h, marks=[] if h == "seq" or f in fast_mc else [pytest.mark.slow])
        for f, h in CASES
    ]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``folder(family, head)``: the saved checkpoint folder (built once per module)."""
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, head: str) -> Path:
        if (family, head) not in made:
            path = tmp_path_factory.mktemp(f"{family}-{head}")
            made[(family, head)] = tiny_families.save_folder(
                family, head, path, initializer_range=0.3
            )
        return made[(family, head)]

    return get


@pytest.fixture(scope="module")
def csqa(tmp_path_factory) -> Path:
    return tiny_families.csqa_files(tmp_path_factory.mktemp("csqa"))


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _data(head: str, csqa: Path) -> list:
    if head == "mc":
        return ["--data", csqa]
    return ["--max-train", 16, "--max-eval", 8]


def _per_layer(names) -> dict[int, int]:
    layers: dict[int, int] = {}
    for name in names:
        layer = int(re.search(r"\.(\d+)\.", name).group(1))
        layers[layer] = layers.get(layer, 0) + 1
    return layers


@pytest.mark.parametrize(("family", "head"), _cases(fast_mc=set(FAMILIES)))
def test_plan_finds_the_default_targets_of_each_layer(family, head, folder, tmp_path):
    result = _cli("plan", _recipe(tmp_path, GMP_80), "--model", folder(family, head), "--json")
    assert result.exit_code == 0, result.output
    section = json.loads(result.output)["model"]
    (stage,) = section["stages"]
    names = [m["name"] for m in stage["matched"]]
    layers = LAYERS.get(family, 2)
    assert _per_layer(names) == {i: TARGETS_PER_LAYER.get(family, 6) for i in range(layers)}
    components = {c["component"] for c in stage["components"] if c["targeted_params"]}
    assert components == {"attention.qkv", "attention.output", "ffn.in", "ffn.out"}
    assert not any(c["component"] == "other" for c in stage["components"])
    assert section["dense_encoder_linears"] == [] and section["problems"] == []


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _check_pruned_run(out: Path, original: Path, family: str, head: str) -> dict:
    """Exactly the default targets are pruned, to exactly 80%; every other tensor is untouched."""
    masks = {n: m.bool() for n, m in load_file(str(out / "model" / "masks.safetensors")).items()}
    with torch.device("meta"):
        model = tiny_families.model(family, head)
    assert sorted(masks) == sorted(arch.default_target_names(model))
    total = sum(m.numel() for m in masks.values())
    assert sum(m.numel() - int(m.sum()) for m in masks.values()) == round(0.8 * total)
    before, after = _weights(original), _weights(out / "model")
    for name, weight in after.items():
        if name in masks:
            assert torch.equal(weight == 0, ~masks[name]), name
        else:  # embeddings, norms, biases, pooler, task head
            assert torch.equal(weight, before[name]), name
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["dense_encoder_linears"] == []
    assert "Every encoder linear layer is pruned." in (out / "report.md").read_text()
    return masks


@pytest.mark.parametrize(("family", "head"), _cases())
def test_gmp_to_80_percent_then_export(family, head, folder, csqa, tmp_path):
    original, out = folder(family, head), tmp_path / "run"
    result = _cli(
        "apply", _recipe(tmp_path, GMP_80), "--model", original, *_data(head, csqa),
        "--output", out, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    masks = _check_pruned_run(out, original, family, head)
    result = _cli("export", out, "--onnx")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "onnx" / "sparsity.json").read_text())
    assert sorted(info["tensors"]) == sorted(masks)
    assert info["task"] == ("multiple-choice" if head == "mc" else "sequence-classification")
    assert info["verification"]["zeros_match_masks"]
    assert info["verification"]["ort_vs_torch_max_abs_diff"] <= 1e-4


TRAINED_FAST = {("modernbert", "seq"), ("albert", "seq"), ("deberta-v2", "seq")}


@pytest.mark.parametrize(
    ("family", "head"),
    [
        pytest.param(f, h, marks=[] if (f, h) in TRAINED_FAST else [pytest.mark.slow])
        for f, h in CASES
    ],
)
def test_gmp_trains_and_prunes_on_a_schedule(family, head, folder, csqa, tmp_path):
    """A few training steps with a gradual schedule: backward through every family."""
    _train_and_check(family, head, folder, csqa, tmp_path)


def _train_and_check(family, head, folder, csqa, tmp_path):
    recipe = _recipe(
        tmp_path,
        """\
training: {steps: 6, batch_size: 4, max_seq_length: 32, seed: 1, learning_rate: 1e-3}
modifiers:
  - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.8, start_step: 1, end_step: 5,
     update_every_steps: 2}
""",
    )
    out = tmp_path / "run"
    result = _cli(
        "apply", recipe, "--model", folder(family, head), *_data(head, csqa),
        "--output", out, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    masks = {n: m.bool() for n, m in load_file(str(out / "model" / "masks.safetensors")).items()}
    with torch.device("meta"):
        names = arch.default_target_names(tiny_families.model(family, head))
    assert sorted(masks) == sorted(names)
    total = sum(m.numel() for m in masks.values())
    assert sum(m.numel() - int(m.sum()) for m in masks.values()) == round(0.8 * total)
    weights = _weights(out / "model")
    for name, mask in masks.items():
        assert torch.equal(weights[name] == 0, ~mask), name


@pytest.mark.parametrize(
    ("family", "head"),
    [
        ("bert", "seq"),
        ("deberta-v2", "seq"),
        ("modernbert", "seq"),
        pytest.param("bert", "mc", marks=pytest.mark.slow),
        pytest.param("deberta-v2", "mc", marks=pytest.mark.slow),
        pytest.param("modernbert", "mc", marks=pytest.mark.slow),
    ],
)
def test_obert_then_export(family, head, folder, csqa, tmp_path):
    original, out = folder(family, head), tmp_path / "run"
    result = _cli(
        "apply", _recipe(tmp_path, OBERT_80), "--model", original, *_data(head, csqa),
        "--output", out, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    masks = {n: m.bool() for n, m in load_file(str(out / "model" / "masks.safetensors")).items()}
    with torch.device("meta"):
        assert sorted(masks) == sorted(arch.default_target_names(tiny_families.model(family)))
    total = sum(m.numel() for m in masks.values())
    assert sum(m.numel() - int(m.sum()) for m in masks.values()) == round(0.8 * total)
    assert _cli("export", out, "--onnx").exit_code == 0


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("family", ["deberta-v2", "mpnet", "modernbert", "albert"])
def test_plan_refuses_targets_that_leave_encoder_linears_dense(family, folder, tmp_path):
    recipe = _recipe(tmp_path, BERT_REGEXES + GMP_80)
    result = _cli("plan", recipe, "--model", folder(family, "seq"))
    assert result.exit_code == 2, result.output
    assert "error: the recipe's targets do not fit" in result.output
    assert f"of this {arch.FAMILIES[tiny_families.config(family).model_type].name} model " in (
        result.output
    )
    assert "would stay dense" in result.output and "Traceback" not in result.output
    if family in ("modernbert", "albert"):
        assert "match no parameter" in result.output
    else:
        assert "match no parameter" not in result.output
    with torch.device("meta"):
        model = tiny_families.model(family)
    named = {"deberta-v2": "query_proj", "mpnet": "attn.q", "modernbert": "Wqkv", "albert": "query"}
    assert named[family] in result.output
    dense = [n for n in arch.default_target_names(model) if named[family] in n]
    assert dense
    as_json = _cli("plan", recipe, "--model", folder(family, "seq"), "--json")
    assert as_json.exit_code == 2
    data = json.loads(as_json.stdout)
    assert set(dense) <= set(data["model"]["dense_encoder_linears"])


def test_plan_accepts_an_explicit_exclude_and_lists_what_stays_dense(folder, tmp_path):
    recipe = _recipe(tmp_path, "exclude: ['layers\\.1\\.attn\\.']\n" + GMP_80)
    result = _cli("plan", recipe, "--model", folder("modernbert", "seq"))
    assert result.exit_code == 0, result.output
    assert "model.layers.1.attn.Wqkv.weight [192, 64]" in result.output
    assert "encoder linear layers left dense by exclude (2):" in result.output
    assert "modernbert, seq 128), stage 'main': 6 target tensors" in result.output


def test_apply_reports_the_encoder_linears_an_exclude_leaves_dense(folder, tmp_path):
    recipe = _recipe(tmp_path, "exclude: ['layers\\.1\\.attn\\.']\n" + GMP_80)
    out = tmp_path / "run"
    result = _cli(
        "apply", recipe, "--model", folder("modernbert", "seq"), "--max-train", 16,
        "--max-eval", 8, "--output", out, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["dense_encoder_linears"] == [
        "model.layers.1.attn.Wqkv.weight",
        "model.layers.1.attn.Wo.weight",
    ]
    markdown = (out / "report.md").read_text()
    assert "Encoder linear layers left dense (2):" in markdown
    assert "- `model.layers.1.attn.Wqkv.weight`" in markdown


def test_apply_refuses_before_the_teacher_trains(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECIPEC_CACHE", str(cache))
    recipe = _recipe(
        tmp_path,
        BERT_REGEXES
        + """\
training: {epochs: 2, batch_size: 8, max_seq_length: 32}
modifiers:
  - {type: gmp, init_sparsity: 0.5, final_sparsity: 0.8, start_epoch: 1, end_epoch: 1}
  - {type: distill, teacher: auto}
""",
    )
    out = tmp_path / "run"
    result = _cli(
        "apply", recipe, "--model", folder("deberta-v2", "seq"), "--max-train", 16,
        "--max-eval", 8, "--output", out,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "the recipe's targets do not fit this model" in result.output
    assert "deberta.encoder.layer.{0-1}.attention.self.query_proj.weight" in result.output
    assert "teacher" not in result.output.split("error:")[0]  # no teacher was fine-tuned
    assert not cache.exists() and not out.exists()


def test_readme_lists_the_tested_families():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    listed = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        key = re.search(r"\(`([\w-]+)`\)", cells[0])
        if key:
            listed[key.group(1)] = cells
    assert list(listed) == list(FAMILIES)
    for family, (name, has_mc) in FAMILIES.items():
        cells = listed[family]
        assert cells[0].startswith(name), cells
        assert cells[-1].startswith("yes" if has_mc else "no"), cells

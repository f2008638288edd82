"""Where the prunable linear layers of BERT-family encoders are, and what each component costs.

recipec prunes the encoder's linear layers only: Q, K, V, the attention output and the two
feed-forward linears of every encoder block; never embeddings, poolers or task heads. This
module finds them from the model's structure, with one table of per-family facts
(:data:`FAMILY_TABLE`, one :class:`Family` per architecture) for the names, fused layouts and
shared-layer schedules that structure alone cannot tell.

Discovery:

1. **Blocks** are the elements of the outermost ``nn.ModuleList`` under the base model whose
   elements all have one class and each hold an ``nn.Linear``. A list whose elements hold all
   their linears inside one nested list of that kind (ALBERT's layer groups) is a container: its
   nested lists supply the blocks. Embeddings, pooler and task heads are never inside a block.
2. **Roles** of the linears in a block come from the family table (names relative to the block)
   when ``config.model_type`` is known; a known family whose block lacks one of its required
   linears, or whose shapes disagree with the roles, is an :class:`ArchitectureError` (never a
   silent half selection). For an unknown family see :func:`infer_roles`.
3. **Uses**: how often a block runs per forward. One per list position by default (a module
   object placed at several positions of the list counts once per position); ALBERT's shared
   layers follow its family schedule (``AlbertTransformer.forward``).

Fused tensors (ModernBERT ``Wqkv`` and ``Wi``, DeBERTa v1 ``in_proj``) carry their row slices
(:attr:`LinearInfo.slices`). Structures and scopes:

- ``blockK`` and ``N:M`` groups run along the input dimension (the last one) inside one output
  row, and every slice is a set of whole rows, so no group straddles Q/K/V or gate/up. The
  divisibility requirement is the same as for separate linears (``Wqkv`` and ``Wi`` read the
  hidden size; ``Wo`` of the MLP reads the intermediate size).
- ``N:M`` keeps N of every M within each group: scope (global or per layer) and the slices do
  not change it.
- Per-layer scope: :meth:`LinearInfo.parts` gives the units, one per slice (Q, K and V of
  ``Wqkv`` are three layers; gate and up of ``Wi`` are two), so a per-layer recipe means the
  same on ModernBERT as on BERT, where they are separate tensors. recipec's pruners rank them
  so (``recipec.sparsity.selection.layer_rows`` -> ``compute_masks(layer_rows=...)``).
- A shared ALBERT layer is one tensor, listed once, with ``uses`` = executions per forward:
  its mask applies at every use, and a FLOPs-weighted global ranking should weight it by uses.

Costs (:func:`component_costs`) are matrix-product FLOPs (2 x multiply-adds) per sequence of
``seq_len`` tokens, each executed layer counted (a shared layer once per use); norms, softmax,
activations, bias adds and embedding lookups count 0. Parameters are counted once each.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

ROLES: tuple[str, ...] = (
    "q",
    "k",
    "v",
    "qkv",
    "attn_out",
    "ffn_in",
    "ffn_in_glu",
    "ffn_out",
    "attn_score",
    "unknown",
)
"""Roles of block linears. ``attn_score``: linears feeding attention scores only (DeBERTa's
relative-position projections, talking heads); ``unknown``: roles the fallback cannot decide."""

TARGET_ROLES: frozenset[str] = frozenset(
    {"q", "k", "v", "qkv", "attn_out", "ffn_in", "ffn_in_glu", "ffn_out"}
)
"""The roles recipec prunes by default (:func:`default_target_names`)."""

COMPONENTS: tuple[str, ...] = (
    "embeddings",
    "attention.qkv",
    "attention.scores",
    "attention.output",
    "ffn.in",
    "ffn.out",
    "layernorm",
    "pooler",
    "head",
    "other",
)
"""Cost components, in report order."""

ROLE_COMPONENT: Mapping[str, str] = {
    "q": "attention.qkv",
    "k": "attention.qkv",
    "v": "attention.qkv",
    "qkv": "attention.qkv",
    "attn_out": "attention.output",
    "ffn_in": "ffn.in",
    "ffn_in_glu": "ffn.in",
    "ffn_out": "ffn.out",
    "attn_score": "attention.scores",
    "unknown": "other",
}

_ATTENTION_ROLES = frozenset({"q", "k", "v", "qkv", "attn_out", "attn_score"})


class ArchitectureError(ValueError):
    """A model of a known family whose encoder blocks do not look like the family table says."""


# --------------------------------------------------------------------------- family table


def _albert_executions(config, n_blocks: int) -> list[tuple[int, ...]]:
    """Executed layer positions of each ALBERT layer (block ``g * inner_group_num + i``).

    ``AlbertTransformer.forward`` runs ``num_hidden_layers`` times a layer group, group
    ``int(n / (num_hidden_layers / num_hidden_groups))`` at step ``n``, and each run of a group
    runs its ``inner_group_num`` layers in order: ``num_hidden_layers * inner_group_num``
    executed layers in all.
    """
    layers, groups = config.num_hidden_layers, config.num_hidden_groups
    inner = config.inner_group_num
    if n_blocks != groups * inner:
        raise ArchitectureError(
            f"ALBERT config has {groups} groups x {inner} layers, the model {n_blocks} blocks"
        )
    out = []
    for block in range(n_blocks):
        group, i = divmod(block, inner)
        steps = [n for n in range(layers) if int(n / (layers / groups)) == group]
        out.append(tuple(n * inner + i for n in steps))
    return out


def _pos_att_types(config) -> list[str]:
    types = getattr(config, "pos_att_type", None) or []
    if isinstance(types, str):
        types = [t.strip() for t in types.lower().split("|")]
    return [t for t in types if t in ("c2p", "p2c")]


def _max_relative_positions(config) -> int:
    span = getattr(config, "max_relative_positions", -1)
    return span if span >= 1 else config.max_position_embeddings


def _deberta_v2_score_flops(config, seq_len: int, width: int, hidden: int) -> float:
    """Relative-position FLOPs of one DeBERTa-v2/v3 attention layer.

    Per type in ``pos_att_type`` (c2p, p2c): projecting the ``2s`` relative embeddings
    (``2 * 2s * hidden * width``; with ``share_att_key`` the Q or K projection is reused, at the
    same cost) and the product with the token queries or keys (``2 * seq_len * 2s * width``).
    ``s`` is ``position_buckets`` when positive, else ``max_relative_positions``: the installed
    code slices ``2s`` embeddings whatever the sequence length. The gathers are free.
    """
    if not getattr(config, "relative_attention", False):
        return 0.0
    buckets = getattr(config, "position_buckets", -1)
    span = buckets if buckets > 0 else _max_relative_positions(config)
    per_type = 2.0 * 2 * span * hidden * width + 2.0 * seq_len * 2 * span * width
    return per_type * len(_pos_att_types(config))


def _deberta_v1_score_flops(config, seq_len: int, width: int, hidden: int) -> float:
    """Like :func:`_deberta_v2_score_flops` with ``s = min(seq_len, max_relative_positions)``."""
    if not getattr(config, "relative_attention", False):
        return 0.0
    span = min(seq_len, _max_relative_positions(config))
    per_type = 2.0 * 2 * span * hidden * width + 2.0 * seq_len * 2 * span * width
    return per_type * len(_pos_att_types(config))


@dataclass(frozen=True)
class Family:
    """Facts about one encoder family that structure alone cannot tell.

    To add a family, append one entry to :data:`FAMILY_TABLE` and a tiny config of it to the
    test matrix in ``tests/unit/test_architectures.py``.

    Attributes:
        name: Family name reported by :func:`family_of`.
        model_types: The ``config.model_type`` values of the family.
        linears: Block-relative module name of each linear -> role (see :data:`ROLES`).
        optional: Names in ``linears`` that only some configs have.
        layouts: Fused linear name -> row layout: ``"qkv"`` (rows viewed as 3 x heads x
            head_dim), ``"head_qkv"`` (heads x 3 x head_dim) or ``"glu"`` (first half is the
            activated gate, second half the linear up).
        components: ``(regex, component)`` pairs matched with ``re.search`` against parameter
            names before the generic rules of :func:`param_components`.
        executions: ``f(config, n_blocks)`` -> executed layer positions of each block, for
            layers reused in a loop (ALBERT); None: each list position runs once.
        score_flops: ``f(config, seq_len, attention_width, hidden)`` -> attention-score FLOPs
            of one executed layer beyond ``QK^T`` and ``AV`` (DeBERTa's relative positions).
    """

    name: str
    model_types: tuple[str, ...]
    linears: Mapping[str, str]
    optional: frozenset[str] = frozenset()
    layouts: Mapping[str, str] = field(default_factory=dict)
    components: tuple[tuple[str, str], ...] = ()
    executions: Callable[..., list[tuple[int, ...]]] | None = None
    score_flops: Callable[..., float] | None = None


_BERT_LINEARS = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "attn_out",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
}

FAMILY_TABLE: tuple[Family, ...] = (
    # BERT, and MiniLM checkpoints (model_type "bert").
    Family("bert", ("bert",), _BERT_LINEARS),
    Family("roberta", ("roberta", "xlm-roberta", "camembert"), _BERT_LINEARS),
    # Factorised embeddings: embeddings_project maps embedding_size to hidden_size.
    Family(
        "electra",
        ("electra",),
        _BERT_LINEARS,
        components=((r"(^|\.)sequence_summary\.", "pooler"),),
    ),
    Family(
        "distilbert",
        ("distilbert",),
        {
            "attention.q_lin": "q",
            "attention.k_lin": "k",
            "attention.v_lin": "v",
            "attention.out_lin": "attn_out",
            "ffn.lin1": "ffn_in",
            "ffn.lin2": "ffn_out",
        },
    ),
    Family(
        "deberta-v2",
        ("deberta-v2",),
        {
            "attention.self.query_proj": "q",
            "attention.self.key_proj": "k",
            "attention.self.value_proj": "v",
            # relative_attention without share_att_key (v2 checkpoints; v3 shares Q/K).
            "attention.self.pos_key_proj": "attn_score",
            "attention.self.pos_query_proj": "attn_score",
            "attention.output.dense": "attn_out",
            "intermediate.dense": "ffn_in",
            "output.dense": "ffn_out",
        },
        optional=frozenset({"attention.self.pos_key_proj", "attention.self.pos_query_proj"}),
        # The relative-position table feeds the scores only. The token convolution after the
        # first layer (encoder.conv, conv_kernel_size > 0: v2 xlarge/xxlarge) stays in "other".
        components=((r"(^|\.)encoder\.rel_embeddings\.", "attention.scores"),),
        score_flops=_deberta_v2_score_flops,
    ),
    Family(
        "deberta",
        ("deberta",),
        {
            # One bias-free projection; per head h rows [3hd, 3hd+d) are Q, then K, then V
            # (transpose_for_scores(qp).chunk(3, dim=-1)). Q and V biases are separate.
            "attention.self.in_proj": "qkv",
            "attention.self.pos_proj": "attn_score",
            "attention.self.pos_q_proj": "attn_score",
            "attention.self.head_logits_proj": "attn_score",
            "attention.self.head_weights_proj": "attn_score",
            "attention.output.dense": "attn_out",
            "intermediate.dense": "ffn_in",
            "output.dense": "ffn_out",
        },
        optional=frozenset(
            {
                "attention.self.pos_proj",
                "attention.self.pos_q_proj",
                "attention.self.head_logits_proj",
                "attention.self.head_weights_proj",
            }
        ),
        layouts={"attention.self.in_proj": "head_qkv"},
        components=(
            (r"\.attention\.self\.(q_bias|v_bias)$", "attention.qkv"),
            (r"(^|\.)encoder\.rel_embeddings\.", "attention.scores"),
        ),
        score_flops=_deberta_v1_score_flops,
    ),
    Family(
        "mpnet",
        ("mpnet",),
        {
            "attention.attn.q": "q",
            "attention.attn.k": "k",
            "attention.attn.v": "v",
            "attention.attn.o": "attn_out",
            "intermediate.dense": "ffn_in",
            "output.dense": "ffn_out",
        },
        # One (buckets x heads) table added to every layer's scores: a lookup, 0 FLOPs.
        components=((r"(^|\.)encoder\.relative_attention_bias\.", "attention.scores"),),
    ),
    # Blocks are albert_layer_groups.<g>.albert_layers.<i>, reused in a loop; the factorised
    # embedding projection (encoder.embedding_hidden_mapping_in) lands in "embeddings".
    Family(
        "albert",
        ("albert",),
        {
            "attention.query": "q",
            "attention.key": "k",
            "attention.value": "v",
            "attention.dense": "attn_out",
            "ffn": "ffn_in",
            "ffn_output": "ffn_out",
        },
        executions=_albert_executions,
    ),
    Family(
        "modernbert",
        ("modernbert",),
        {"attn.Wqkv": "qkv", "attn.Wo": "attn_out", "mlp.Wi": "ffn_in_glu", "mlp.Wo": "ffn_out"},
        # Wqkv output viewed (3, heads, head_dim); Wi output chunked in two, act(first) * second.
        layouts={"attn.Wqkv": "qkv", "mlp.Wi": "glu"},
        # ModernBertPredictionHead (dense, act, norm) runs on the pooled vector: a pooler.
        components=((r"^head\.", "pooler"),),
    ),
)
"""One entry per architecture; :data:`FAMILIES` indexes it by ``config.model_type``."""

FAMILIES: Mapping[str, Family] = {t: f for f in FAMILY_TABLE for t in f.model_types}


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Block:
    """One encoder block (a repeated layer module).

    Attributes:
        name: Module name of the block in the model.
        module: The block.
        layer: Storage index (position in its list; ALBERT: group x inner_group_num + inner).
        executed_at: Executed layer positions per forward (one per use).
    """

    name: str
    module: nn.Module = field(repr=False)
    layer: int
    executed_at: tuple[int, ...]

    @property
    def uses(self) -> int:
        """Executions per forward."""
        return len(self.executed_at)


@dataclass(frozen=True)
class LinearInfo:
    """One ``nn.Linear`` of an encoder block.

    Attributes:
        param_name: Full name of its weight in ``model.named_parameters()``.
        module_name: Full module name.
        role: One of :data:`ROLES`.
        layer: Storage index of its block (see :class:`Block`).
        in_features: Input width.
        out_features: Output width (rows of the weight).
        uses: Executions per forward (ALBERT: executions of the shared layer).
        slices: For fused linears of a known layout, part -> row ranges (``q``/``k``/``v`` of a
            ``qkv``, ``gate``/``up`` of an ``ffn_in_glu``), each part's rows in head order;
            empty for separate linears and fused ones of unknown layout.
        heads: Attention heads (attention roles only).
        head_dim: Width of one head (rows per head of q/k/v, columns per head of attn_out).
        executed_at: Executed layer positions per forward.
        bias_name: Full name of its bias, or None.
    """

    param_name: str
    module_name: str
    role: str
    layer: int
    in_features: int
    out_features: int
    uses: int = 1
    slices: dict[str, tuple[range, ...]] = field(default_factory=dict, hash=False)
    heads: int | None = None
    head_dim: int | None = None
    executed_at: tuple[int, ...] = ()
    bias_name: str | None = None

    @property
    def component(self) -> str:
        """Cost component of the linear (see :data:`COMPONENTS`)."""
        return ROLE_COMPONENT[self.role]

    def rows(self, part: str) -> torch.Tensor:
        """Row indices of one part, in head order: ``rows("q").view(heads, head_dim)``."""
        if not self.slices:
            if part != self.role:
                raise KeyError(f"{self.param_name} is not fused; its only part is {self.role!r}")
            return torch.arange(self.out_features)
        return torch.cat([torch.arange(r.start, r.stop) for r in self.slices[part]])

    def parts(self) -> dict[str, torch.Tensor]:
        """The per-layer-scope units of this weight: part name -> row indices."""
        names = list(self.slices) or [self.role]
        return {name: self.rows(name) for name in names}


def _config(model: nn.Module):
    return getattr(model, "config", None)


def family_of(model: nn.Module) -> str | None:
    """The family name of ``model`` (``config.model_type`` in the table), or None."""
    config = _config(model)
    family = FAMILIES.get(getattr(config, "model_type", None))
    return family.name if family else None


def _base(model: nn.Module) -> tuple[nn.Module, str]:
    base = getattr(model, "base_model", model)
    if not isinstance(base, nn.Module):
        return model, ""
    for name, module in model.named_modules():
        if module is base:
            return base, name
    return model, ""


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _is_block_list(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(m) for m in module}) == 1
        and all(_linears(m) for m in module)
    )


def _nested_block_list(element: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The one block list holding all of ``element``'s linears, if any (ALBERT's groups)."""
    lists = [(n, m) for n, m in element.named_modules() if n and _is_block_list(m)]
    outer = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists)]
    if len(outer) != 1:
        return None
    name, inner = outer[0]
    if len(_linears(inner)) != len(_linears(element)):
        return None
    return name, inner


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    base, base_name = _base(model)
    found: list[tuple[str, nn.ModuleList]] = []

    def expand(name: str, blocks: nn.ModuleList) -> None:
        nested = [_nested_block_list(m) for m in blocks]
        if all(nested):
            for i, (inner_name, inner) in enumerate(nested):
                expand(f"{name}.{i}.{inner_name}", inner)
        else:
            found.append((name, blocks))

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if _is_block_list(child):
                expand(full, child)
            else:
                visit(child, full)

    visit(base, base_name)
    return found


def encoder_blocks(model: nn.Module) -> list[Block]:
    """The encoder blocks of ``model``, in storage order, each once (see the module doc)."""
    blocks: list[Block] = []
    offset = 0
    for list_name, blocks_list in _block_lists(model):
        positions: dict[int, list[int]] = {}
        for i, module in enumerate(blocks_list):
            positions.setdefault(id(module), []).append(offset + i)
        for at in positions.values():
            first = at[0] - offset
            blocks.append(Block(f"{list_name}.{first}", blocks_list[first], at[0], tuple(at)))
        offset += len(blocks_list)
    family = FAMILIES.get(getattr(_config(model), "model_type", None))
    if family is not None and family.executions is not None and blocks:
        schedule = family.executions(_config(model), len(blocks))
        blocks = [
            Block(b.name, b.module, b.layer, executed) for b, executed in zip(blocks, schedule)
        ]
    return blocks


def infer_roles(shapes: Sequence[tuple[int, int]], hidden: int | None = None) -> list[str]:
    """Roles of a block's linears from their ``(in, out)`` shapes in registration order.

    The structural fallback for families not in the table. With ``H`` the hidden size
    (``config.hidden_size``, else the first linear's input width) it accepts two patterns:

    - six linears ``H->A, H->B, H->B, A->H, H->F, G->H``: q, k, v, attn_out, then ``ffn_in``
      when ``F == G`` or ``ffn_in_glu`` when ``F == 2G``, and ``ffn_out``;
    - four linears ``H->3A, A->H, H->F, G->H``: a fused qkv, attn_out, ffn_in (or glu), ffn_out.

    Order decides where shapes cannot (when the FFN width equals the hidden size). Anything
    else gets ``unknown`` for every linear, so callers can report the linears. A fused tensor
    found this way has no slices: its row layout is not knowable from shapes.
    """
    shapes = list(shapes)
    if not shapes:
        return []
    h = hidden or shapes[0][0]

    def ffn(f_out: int, g_in: int) -> str | None:
        return "ffn_in" if f_out == g_in else "ffn_in_glu" if f_out == 2 * g_in else None

    if len(shapes) == 6:
        (qi, qo), (ki, ko), (vi, vo), (oi, oo), (fi, fo), (gi, go) = shapes
        kind = ffn(fo, gi)
        if qi == ki == vi == fi == h and ko == vo and oi == qo and oo == go == h and kind:
            return ["q", "k", "v", "attn_out", kind, "ffn_out"]
    if len(shapes) == 4:
        (qi, qo), (oi, oo), (fi, fo), (gi, go) = shapes
        kind = ffn(fo, gi)
        if qi == fi == h and qo == 3 * oi and oo == go == h and kind:
            return ["qkv", "attn_out", kind, "ffn_out"]
    return ["unknown"] * len(shapes)


def _layout_slices(layout: str, out: int, heads: int | None) -> dict[str, tuple[range, ...]]:
    if layout == "glu":
        half = out // 2
        return {"gate": (range(0, half),), "up": (range(half, out),)}
    width = out // 3
    if layout == "qkv":
        return {p: (range(i * width, (i + 1) * width),) for i, p in enumerate("qkv")}
    if layout == "head_qkv":
        if not heads:
            raise ArchitectureError("a per-head fused qkv layout needs config.num_attention_heads")
        d = width // heads
        return {
            p: tuple(range((3 * h + i) * d, (3 * h + i + 1) * d) for h in range(heads))
            for i, p in enumerate("qkv")
        }
    raise ValueError(f"unknown layout {layout!r}")


def _family_roles(family: Family, block: Block, rel_names: list[str]) -> list[str]:
    missing = set(family.linears) - family.optional - set(rel_names)
    if missing:
        raise ArchitectureError(
            f"{block.name}: a {family.name} block should have the linears {sorted(missing)}; "
            f"it has {rel_names}. Fix the {family.name!r} entry of FAMILY_TABLE."
        )
    return [family.linears.get(n, "unknown") for n in rel_names]


def _check_shapes(
    block: Block, infos: list[LinearInfo], heads: int | None, hidden: int | None
) -> None:
    """Shapes must agree with the roles (catches a wrong family entry)."""
    by_role: dict[str, list[LinearInfo]] = {}
    for info in infos:
        by_role.setdefault(info.role, []).append(info)

    def one(role: str) -> LinearInfo | None:
        found = by_role.get(role, [])
        if len(found) > 1:
            raise ArchitectureError(f"{block.name}: {len(found)} linears with role {role!r}")
        return found[0] if found else None

    q, k, v, qkv, out = one("q"), one("k"), one("v"), one("qkv"), one("attn_out")
    f_in, glu, f_out = one("ffn_in"), one("ffn_in_glu"), one("ffn_out")
    problems = []
    for info in infos:
        if hidden and info.role in ("q", "k", "v", "qkv", "ffn_in", "ffn_in_glu"):
            if info.in_features != hidden:
                problems.append(f"{info.role} reads {info.in_features}, not the hidden size")
        if hidden and info.role in ("attn_out", "ffn_out") and info.out_features != hidden:
            problems.append(f"{info.role} writes {info.out_features}, not the hidden size")
    width = q.out_features if q else qkv.out_features // 3 if qkv else None
    if qkv and qkv.out_features % 3:
        problems.append(f"qkv has {qkv.out_features} rows, not a multiple of 3")
    if width is not None and heads and width % heads:
        problems.append(f"attention width {width} is not a multiple of {heads} heads")
    if k and v and k.out_features != v.out_features:
        problems.append("k and v differ in width")
    if out and width is not None and out.in_features != width:
        problems.append(f"attn_out reads {out.in_features}, attention width is {width}")
    if f_out and f_in and f_in.out_features != f_out.in_features:
        problems.append(f"ffn_in writes {f_in.out_features}, ffn_out reads {f_out.in_features}")
    if f_out and glu and glu.out_features != 2 * f_out.in_features:
        problems.append(f"ffn_in_glu writes {glu.out_features}, ffn_out reads {f_out.in_features}")
    if problems:
        raise ArchitectureError(f"{block.name}: shapes disagree with roles: {'; '.join(problems)}")


def encoder_linears(model: nn.Module, *, use_table: bool = True) -> list[LinearInfo]:
    """Every ``nn.Linear`` of the encoder blocks, each weight once, with its role.

    Args:
        model: A transformers model (any head) or a bare encoder; meta-device models work.
        use_table: Use the family table for known families; False forces the structural
            fallback (tests compare the two).

    Returns:
        One :class:`LinearInfo` per block linear, in block then registration order.

    Raises:
        ArchitectureError: A known family's block disagrees with its table entry.
    """
    config = _config(model)
    family = FAMILIES.get(getattr(config, "model_type", None)) if use_table else None
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    names = {id(p): n for n, p in model.named_parameters()}
    result: list[LinearInfo] = []
    seen: set[int] = set()
    for block in encoder_blocks(model):
        linears = _linears(block.module)
        rel_names = [n for n, _ in linears]
        if family is not None:
            roles = _family_roles(family, block, rel_names)
        else:
            roles = infer_roles([(m.in_features, m.out_features) for _, m in linears], hidden)
        layouts = family.layouts if family is not None else {}
        infos = []
        for (rel, module), role in zip(linears, roles):
            slices = {}
            if rel in layouts:
                slices = _layout_slices(layouts[rel], module.out_features, heads)
            head_dim = None
            if role in _ATTENTION_ROLES and heads:
                width = module.in_features if role == "attn_out" else module.out_features
                head_dim = width // (3 * heads) if role == "qkv" else width // heads
            bias = module.bias
            info = LinearInfo(
                param_name=names[id(module.weight)],
                module_name=f"{block.name}.{rel}",
                role=role,
                layer=block.layer,
                in_features=module.in_features,
                out_features=module.out_features,
                uses=block.uses,
                slices=slices,
                heads=heads if head_dim is not None else None,
                head_dim=head_dim,
                executed_at=block.executed_at,
                bias_name=names.get(id(bias)) if bias is not None else None,
            )
            infos.append(info)
        _check_shapes(block, infos, heads, hidden)
        for info, (_, module) in zip(infos, linears):
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                result.append(info)
    return result


def default_target_names(model: nn.Module) -> list[str]:
    """Weight names recipec prunes by default (roles in :data:`TARGET_ROLES`), each once."""
    return [i.param_name for i in encoder_linears(model) if i.role in TARGET_ROLES]


# --------------------------------------------------------------------------- costs


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or "norm" in type(module).__name__.lower()


def param_components(model: nn.Module) -> dict[str, str]:
    """The cost component of every parameter (names as in ``model.named_parameters()``).

    Rules, first match wins: block linears by role (bias with weight); the family's
    ``components`` regexes; modules named ``*pooler*`` -> pooler; inside the base model,
    modules named ``*embedding*`` and ``nn.Embedding`` tables -> embeddings (so the factorised
    embedding projections of ALBERT and ELECTRA, and the embedding LayerNorm, land there);
    norms -> layernorm; outside the base model -> head; anything else -> other.
    """
    config = _config(model)
    family = FAMILIES.get(getattr(config, "model_type", None))
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, str] = {}
    for info in encoder_linears(model):
        out[info.param_name] = info.component
        if info.bias_name:
            out[info.bias_name] = info.component
    _, base_name = _base(model)
    overrides = [(re.compile(p), c) for p, c in (family.components if family else ())]
    for module_name, module in model.named_modules():
        parts = module_name.split(".")
        inside_base = (
            not base_name or module_name == base_name or module_name.startswith(base_name + ".")
        )
        for param in module.parameters(recurse=False):
            name = names.get(id(param))
            if name is None or name in out:
                continue
            component = next((c for r, c in overrides if r.search(name)), None)
            if component is None:
                if any("pooler" in p for p in parts):
                    component = "pooler"
                elif inside_base and (
                    isinstance(module, nn.Embedding) or any("embedding" in p for p in parts)
                ):
                    component = "embeddings"
                elif _is_norm(module):
                    component = "layernorm"
                elif not inside_base:
                    component = "head"
                else:
                    component = "other"
            out[name] = component
    return out


@dataclass(frozen=True)
class ComponentCost:
    """Parameters and FLOPs of one component.

    Attributes:
        component: One of :data:`COMPONENTS`.
        params: Parameters (a shared parameter counted once).
        flops: Matrix-product FLOPs per sequence (2 x multiply-adds; a shared layer per use).
    """

    component: str
    params: int
    flops: float


def component_costs(model: nn.Module, seq_len: int) -> dict[str, ComponentCost]:
    """Parameters and FLOPs per component for one sequence of ``seq_len`` tokens.

    Linears run on every token (``2 * seq_len * in * out`` per use); pooler and head linears
    on one token; DeBERTa's relative-position linears (role ``attn_score``) are counted by the
    family's ``score_flops``. ``attention.scores`` is ``QK^T`` plus ``AV``,
    ``4 * seq_len**2 * width`` per executed attention (``width`` = heads x head_dim, the hidden
    size in all table families), plus the family's extra terms (DeBERTa c2p/p2c). ModernBERT's
    local-attention layers are counted in full: the installed sdpa/eager paths mask a full
    ``L x L`` product. MPNet's relative bias and all gathers are lookups (0).

    Returns:
        :data:`COMPONENTS` (all of them, in order) -> :class:`ComponentCost`.
    """
    config = _config(model)
    family = FAMILIES.get(getattr(config, "model_type", None))
    components = param_components(model)
    params = dict.fromkeys(COMPONENTS, 0)
    flops = dict.fromkeys(COMPONENTS, 0.0)
    for name, param in model.named_parameters():
        params[components[name]] += param.numel()
    infos = {i.param_name: i for i in encoder_linears(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    for module in {id(m): m for m in model.modules()}.values():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear | nn.Conv1d) or id(weight) not in names:
            continue
        name = names[id(weight)]
        info = infos.get(name)
        if info is not None and info.role == "attn_score":
            continue
        component = components[name]
        tokens = 1 if component in ("pooler", "head") else seq_len
        uses = info.uses if info is not None else 1
        if isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
        else:
            macs = (
                module.out_channels * (module.in_channels // module.groups) * module.kernel_size[0]
            )
        flops[component] += 2.0 * tokens * macs * uses
    hidden = getattr(config, "hidden_size", None)
    by_layer: dict[int, list[LinearInfo]] = {}
    for info in infos.values():
        by_layer.setdefault(info.layer, []).append(info)
    for layer_infos in by_layer.values():
        width = None
        for info in layer_infos:
            if info.role == "q":
                width = info.out_features
            elif info.role == "qkv":
                width = info.out_features // 3
        if width is None and family is None and getattr(config, "num_attention_heads", None):
            width = hidden  # unknown roles: assume one full-width attention per block
        if width is None:
            continue
        per_use = 4.0 * seq_len * seq_len * width
        if family is not None and family.score_flops is not None:
            per_use += family.score_flops(config, seq_len, width, hidden or width)
        flops["attention.scores"] += per_use * layer_infos[0].uses
    return {c: ComponentCost(c, params[c], flops[c]) for c in COMPONENTS}

"""``lr``: a learning-rate window of the recipe (the schedule itself lives in the plan)."""

from __future__ import annotations

from recipec.modifiers.base import CompileContext, CompileError, Modifier
from recipec.plan import ResolvedModifier


class LRModifier(Modifier):
    """An ``lr`` window: pure schedule data. The stage's ``lr`` modifiers shape
    :meth:`recipec.plan.StagePlan.lr_at`, and the :class:`~recipec.program.Program` (the one
    owner of the learning rate) writes it into the optimizer at every ``step_start``."""

    def __init__(self, resolved: ResolvedModifier, ctx: CompileContext):
        super().__init__(resolved, ctx)
        if ctx.optimizer is None:
            raise CompileError("an lr modifier needs the optimizer: pass optimizer= to compile()")

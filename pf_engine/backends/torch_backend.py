"""The ``torch`` backend: every adapted product is the grouped product (grouped.py) in plain
torch; its per-Linear state is the Linear's gathered active sets."""
from __future__ import annotations

from pf_engine.backends.base import Backend
from pf_engine.backends.grouped import Gathered, grouped


class Torch(Backend):
    name = "torch"

    def prepare(self, lin) -> Gathered | None:
        return Gathered() if lin.parts else None

    def mixed(self, lin, x2, mix, decode):
        return grouped(lin, x2, mix, lin.state)

"""The interventions, one per file, and the registry that names them."""

from __future__ import annotations

from interventions.methods.base import Method, RowState
from interventions.methods.carve import CARVE
from interventions.methods.gift import GIFT
from interventions.methods.var import VAR
from interventions.methods.vhr import VHR

# Order matters when one request asks for several methods: input rewriting (CARVE) first, then the
# attention edits in this order within a layer.
METHODS: dict[str, Method] = {m.name: m for m in (CARVE(), VAR(), GIFT(), VHR())}

__all__ = ["METHODS", "Method", "RowState"]

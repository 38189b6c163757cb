"""The distillation methods, one module each, looked up by ``distill.method``.

A new method is one module with a :class:`opd.methods.base.Method` subclass and one line here
(docs/algorithms.md has the formulas; docs/methods.md a 20-line example).
"""

from __future__ import annotations

from opd.methods.base import Method
from opd.methods.copsd import Copsd
from opd.methods.fire import Fire
from opd.methods.gkd import GKD
from opd.methods.sampled import SampledOPD
from opd.methods.sft import SFT

METHODS: dict[str, Method] = {m.name: m for m in (SampledOPD(), GKD(), SFT(), Fire(), Copsd())}

"""The repair ``none``: the fused model as averaging left it."""

from __future__ import annotations

from ..registry import REPAIRS, Unit

NONE = REPAIRS.register(Unit(name="none", description="no repair", fn=None))

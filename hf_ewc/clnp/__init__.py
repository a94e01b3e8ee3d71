"""CLNP — continual learning by neural pruning: see [`hf_ewc.clnp.allocation`] and [`hf_ewc.clnp.units`]."""

from .allocation import CLNP, CLNP_STATE_NAME, CLNPCallback
from .units import UnitGroup, UnitSlice, unit_groups


__all__ = ["CLNP", "CLNP_STATE_NAME", "CLNPCallback", "UnitGroup", "UnitSlice", "unit_groups"]

"""Stage 3: aggregation of sensitivities and bit allocation (pure functions, no torch)."""
from tasa.allocate.dp import Allocation, allocate

__all__ = ["Allocation", "allocate"]

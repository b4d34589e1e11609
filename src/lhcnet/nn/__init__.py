"""Neural-network layers."""
from .lhc import LHC

__all__ = ["LHC"]

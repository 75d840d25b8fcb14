"""Protection methods. How one plugs in: `base.py`; the built-in ones: map, ntp, baselines (magnitude)."""
from .base import (
    Checkpoints,
    DataNeeds,
    MethodResult,
    ProtectionData,
    ProtectionMethod,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["Checkpoints", "DataNeeds", "MethodResult", "ProtectionData", "ProtectionMethod", "get_method",
           "list_methods", "register_method"]

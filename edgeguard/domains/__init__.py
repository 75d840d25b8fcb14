"""Named image domains, decoded at a model's input (uint8 N×C×H×W) with int64 labels and fixed splits."""
from . import embedded as _embedded  # noqa: F401  (registers the embedded samples)
from .base import Domain
from .registry import get_domain, list_domains, register_domain, resolve_data_root

__all__ = ["Domain", "get_domain", "list_domains", "register_domain", "resolve_data_root"]

"""Named image domains, all brought to uint8 (N, 3, 32, 32) with int64 labels and fixed splits."""
from . import embedded as _embedded  # noqa: F401  (registers the embedded samples)
from .base import IMAGE_SIZE, MEAN, STD, Domain
from .registry import get_domain, list_domains, register_domain, resolve_data_root

__all__ = ["Domain", "IMAGE_SIZE", "MEAN", "STD", "get_domain", "list_domains", "register_domain",
           "resolve_data_root"]

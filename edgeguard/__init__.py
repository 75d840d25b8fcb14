"""edgeguard: protect an edge image classifier against reuse on unauthorised domains.

The heavy parts (torch) load lazily; `import edgeguard` stays cheap so the CLI starts fast.
"""
from .errors import CheckFailed, EdgeguardError

__version__ = "0.1.0"
__all__ = ["EdgeguardError", "CheckFailed", "__version__"]

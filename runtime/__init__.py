"""edgeguard device runtime: verifies signed bundles and measures them, with no PyTorch.

This package must import on a device that has neither torch nor the host packages (a test enforces it).
"""

__version__ = "0.1.0"

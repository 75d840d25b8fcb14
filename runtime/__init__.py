"""edgeguard device runtime: verifies signed bundles and measures them, with no PyTorch.

This package must import on a device that has neither torch nor the host packages (a test enforces it).
"""
import os as _os

# ONNX Runtime otherwise writes a device id and a telemetry database under $XDG_CACHE_HOME/Microsoft/ on
# every run; a camera (and the host's converters, which import this package) send and keep nothing.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

"""ONNX Runtime: CPU everywhere; CUDA and TensorRT execution providers when the installed build has them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import BundleError

PREFERRED = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def provider_options(providers: list[str], precision: str = "fp32") -> list[dict]:
    """Options per provider: ORT's TensorRT provider keeps its engines and timing cache in the device-level
    engine cache (so a restart builds nothing) and uses fp16 where the manifest's precision says so."""
    from ..engine_cache import cache_dir

    out = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            path = str(cache_dir() / "ort-trt")
            out.append({"trt_engine_cache_enable": "True", "trt_engine_cache_path": path,
                        "trt_timing_cache_enable": "True", "trt_timing_cache_path": path,
                        "trt_fp16_enable": "True" if precision in ("fp16", "int8") else "False",
                        "trt_int8_enable": "True" if precision == "int8" else "False"})
        else:
            out.append({})
    return out


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, providers: list[str] | None = None, input_name: str = "input",
                 output_name: str = "logits", precision: str = "fp32"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("ONNX Runtime is not installed: pip install 'edgeguard-runtime[cpu]' (CPU), "
                              "'edgeguard-runtime[gpu]' (NVIDIA GPU), or on a Jetson NVIDIA's onnxruntime-gpu "
                              "wheel for its JetPack") from None
        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()  # a camera sends nothing anywhere
        available = ort.get_available_providers()
        wanted = providers or [p for p in PREFERRED if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BundleError(f"ONNX Runtime provider {missing[0]} is not available here (available: "
                              f"{', '.join(available)})")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            options = provider_options(wanted, precision)
            for o in options:
                if "trt_engine_cache_path" in o:
                    Path(o["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=wanted,
                                                provider_options=options)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"{model_path}: ONNX Runtime cannot load the model ({str(e).splitlines()[0]})") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.input_name = input_name if input_name in inputs else inputs[0]
        if output_name not in outputs:
            raise BundleError(f"{model_path.name}: the manifest names output {output_name[:60]!r}, the model has "
                              f"{', '.join(outputs)}")
        self.output_name = output_name
        self.providers = self.session.get_providers()

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "version": ort.__version__, "providers": self.providers}

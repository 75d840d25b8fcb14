"""INT8 through explicit quantisation: a QDQ ONNX model made with onnxruntime's static quantiser, calibrated
on authorised-domain samples. Works for TensorRT 10 and 11 alike (Q/DQ nodes carry the precision).

Weights are quantised symmetrically per channel (zero point 0), so a masked 0 stays exactly 0 in int8;
`remap_initializers` points the mask at the quantised weight tensors for the integrity check.
The first convolution and the final classifier stay in float (the usual practice; quantising them too cost
much top-1 agreement with fp32). Only Conv/Gemm/MatMul are quantised, pooling stays float. MinMax
calibration (Percentile and Entropy measured no better). Activations are symmetric int8 too, as TensorRT's
explicit quantisation requires. Numbers: benchmarks/RESULTS.md, "int8".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class _Reader:
    def __init__(self, x: np.ndarray, input_name: str, batch: int = 32):
        n = len(x) - len(x) % batch if len(x) > batch else len(x)  # equal batches: histogram calibrators need them
        self.batches = [{input_name: x[i : i + batch]} for i in range(0, n, batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: np.ndarray, input_name: str = "input") -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception:
        src = fp32_path
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    fcs = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    exclude = convs[:1] + fcs[-1:]
    quantize_static(str(src), str(out_path), _Reader(calibration.astype(np.float32), input_name),
                    nodes_to_exclude=exclude, op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    pre.unlink(missing_ok=True)


def remap_initializers(qdq_path: Path, mapping: dict[str, str]) -> dict[str, str]:
    """After quantisation a weight W lives in `W_quantized` (int8): point the mask there."""
    import onnx

    names = {i.name for i in onnx.load(str(qdq_path), load_external_data=False).graph.initializer}
    out = {}
    for layer, init in mapping.items():
        for cand in (f"{init}_quantized", init):
            if cand in names:
                out[layer] = cand
                break
        else:
            raise ValueError(f"quantised model has no initializer for {layer!r} ({init})")
    return out

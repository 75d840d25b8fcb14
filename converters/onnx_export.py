"""Export a protected classifier to ONNX with the mask baked in, and the guards that fail the build.

Exporter: the dynamo exporter (`torch.onnx.export(dynamo=True)`: torch.export + onnxscript), opset 18,
dynamic batch, eval mode, optimised: BatchNorm is folded into the preceding convolution (a zero weight stays
zero because folding only scales whole output channels) and parameter names survive as initializer names,
so masks map to initializers by name. The TorchScript exporter (opset 17; masks mapped by module scope and
call order) is only a fallback where the dynamo one fails, logged with the reason and recorded in the
bundle summary and the ONNX metadata (`edgeguard_exporter`). It writes one self-contained file; should a model exceed 2 GB,
external data files are listed by `model_files` and covered by the bundle's hashes all the same.
Input normalisation is NOT in the graph: the manifest states it and the runtime applies it.

Guards (each raises ExportError): a parametrization or a `*_orig` / `*_mask` tensor left in the model or the
graph (that would ship the unprotected weights), a masked position that is not exactly 0 in the initializers
(checked after folding), a mask layer that cannot be mapped to an initializer, and parity with PyTorch on
real samples (max |Δlogit| ≤ 1e-4 in fp32, top-1 agreement 100 %).
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import maskbits

OPSET = 18  # the dynamo exporter's lowest; the TorchScript fallback exports 17
LEGACY_OPSET = 17
FP32_ATOL = 1e-4
log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    mapping: dict[str, str]  # mask layer → ONNX initializer
    exporter: str  # dynamo | torchscript
    opset: int
    fallback_reason: str | None = None


class ExportError(Exception):
    pass


def _guard_module(model) -> None:
    from torch.nn.utils import parametrize

    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            raise ExportError(f"module {name or '(root)'} still has a parametrization: remove it with "
                              "remove_parametrizations(leave_parametrized=True) before export")
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("_orig") or name.endswith("_mask"):
            raise ExportError(f"tensor {name!r} would ship the dense weights or the mask: call "
                              "torch.nn.utils.prune.remove() (or bake the mask) before export")


def prunable_call_order(model, names: list[str], input_shape=(3, 32, 32)) -> list[str]:
    """The mask layers in the order their modules run in forward (to match ONNX nodes when names are lost)."""
    import torch

    mods = {n[: -len(".weight")]: n for n in names}
    order: list[str] = []
    handles = []
    for mname, mod in model.named_modules():
        if mname in mods:
            handles.append(mod.register_forward_hook(lambda m, i, o, k=mname: order.append(mods[k])))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    seen = []
    for n in order:
        if n not in seen:
            seen.append(n)
    return seen


def map_mask_to_initializers(onnx_model, model, masks: dict[str, np.ndarray], input_shape=(3, 32, 32)
                             ) -> dict[str, str]:
    """Mask layer name → ONNX initializer name: by the node's module scope, else by call order and shape."""
    inits = {i.name: tuple(i.dims) for i in onnx_model.graph.initializer}
    weight_nodes = [n for n in onnx_model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
                    and len(n.input) > 1 and n.input[1] in inits]
    mapping: dict[str, str] = {}
    for layer in masks:
        if layer in inits:
            mapping[layer] = layer
            continue
        scope = "/" + "/".join(_scopes(layer[: -len(".weight")])) + "/"
        hits = [n for n in weight_nodes if n.name.startswith(scope) and n.name[len(scope):].count("/") == 0]
        if len(hits) == 1:
            mapping[layer] = hits[0].input[1]
    missing = [k for k in masks if k not in mapping]
    if missing:
        order = prunable_call_order(model, list(masks), input_shape)
        free = [n for n in weight_nodes if n.input[1] not in mapping.values()]
        rest = [k for k in order if k in missing]
        for layer, node in zip(rest, free):
            if inits[node.input[1]] == tuple(masks[layer].shape):
                mapping[layer] = node.input[1]
    missing = [k for k in masks if k not in mapping]
    if missing:
        raise ExportError(f"cannot find the ONNX initializer of masked layer {missing[0]!r}")
    for layer, init in mapping.items():
        if inits[init] != tuple(masks[layer].shape):
            raise ExportError(f"initializer {init!r} has shape {inits[init]}, mask {layer!r} {masks[layer].shape}")
    return mapping


def _scopes(module_path: str) -> list[str]:
    """`encoder.0` → ['encoder', 'encoder.0'] (the legacy exporter's node-name scopes)."""
    parts = module_path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _export_dynamo(m, input_shape, input_name: str, output_name: str) -> bytes:
    """torch.export + onnxscript: parameter names survive as initializer names; BatchNorm is folded."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(m, (torch.zeros(1, *input_shape),), dynamo=True, opset_version=OPSET,
                                 input_names=[input_name], output_names=[output_name],
                                 dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    return prog.model_proto.SerializeToString()


def _export_torchscript(m, input_shape, input_name: str, output_name: str) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that this exporter will go: it is only our fallback
        torch.onnx.export(m, (torch.zeros(1, *input_shape),), buf, dynamo=False, opset_version=LEGACY_OPSET,
                          input_names=[input_name], output_names=[output_name], do_constant_folding=True,
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    return buf.getvalue()


def export_onnx(model, masks: dict[str, np.ndarray], out_path: Path, input_shape=(3, 32, 32),
                input_name: str = "input", output_name: str = "logits",
                metadata: dict[str, str] | None = None, exporter: str = "auto") -> ExportResult:
    """Bake `masks` into a copy of `model`, export it (the dynamo exporter; the TorchScript one only as a
    fallback that says why), run the guards; returns the mask layer → initializer mapping and what was used."""
    import copy

    import onnx
    import torch

    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    _guard_module(model)
    m = copy.deepcopy(model).cpu().float().eval()
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            if name not in params:
                raise ExportError(f"mask names {name!r} but the model has no such parameter")
            params[name].mul_(torch.from_numpy(np.asarray(keep, bool)).to(params[name].dtype))
    used, opset, reason, data = "dynamo", OPSET, None, None
    if exporter in ("auto", "dynamo"):
        try:
            data = _export_dynamo(m, input_shape, input_name, output_name)
        except Exception as e:  # noqa: BLE001 — any failure of the new exporter falls back, and says why
            if exporter == "dynamo":
                raise ExportError(f"the dynamo exporter failed: {type(e).__name__}: {str(e).splitlines()[0]}") \
                    from None
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            log.warning("ONNX export: the dynamo exporter failed (%s); using the TorchScript exporter", reason)
    if data is None:
        used, opset = "torchscript", LEGACY_OPSET
        data = _export_torchscript(m, input_shape, input_name, output_name)
    onnx_model = onnx.load_from_string(data)
    for init in onnx_model.graph.initializer:
        if init.name.endswith("_orig") or init.name.endswith("_mask"):
            raise ExportError(f"initializer {init.name!r} would ship the dense weights or the mask")
    mapping = map_mask_to_initializers(onnx_model, m, masks, input_shape)
    check_zero_pattern(onnx_model, masks, mapping)
    onnx_model.doc_string = "edgeguard protected classifier (mask baked in)"
    del onnx_model.metadata_props[:]  # torch.export's own provenance keys: ours below are what a reader needs
    for k, v in {**(metadata or {}), "edgeguard_exporter": used}.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.checker.check_model(onnx_model)
    onnx.shape_inference.infer_shapes(onnx_model, check_type=True, strict_mode=True)
    out_path.write_bytes(onnx_model.SerializeToString())
    return ExportResult(mapping, used, opset, reason)


def check_zero_pattern(onnx_model, masks: dict[str, np.ndarray], mapping: dict[str, str]) -> None:
    """Every masked position is exactly 0 in its initializer ("mask zeros ⊆ weight zeros")."""
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx_model.graph.initializer}
    weights = {layer: numpy_helper.to_array(inits[mapping[layer]]) for layer in masks}
    bad = maskbits.zero_violations(masks, weights)
    if bad:
        layer, n = next(iter(bad.items()))
        raise ExportError(f"{n} masked weights of {layer!r} (initializer {mapping[layer]!r}) are not 0 after export")


def parity(model, onnx_path: Path, x: np.ndarray, atol: float = FP32_ATOL) -> dict:
    """Compare PyTorch and ONNX Runtime logits on real (already normalised) samples."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.cpu().float().eval()(torch.from_numpy(x)).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    diff = float(np.abs(ref - got).max()) if len(x) else 0.0
    agree = float((ref.argmax(1) == got.argmax(1)).mean()) if len(x) else 1.0
    if diff > atol or agree < 1.0:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch: max |Δlogit| {diff:.2e} (limit {atol:.0e}), "
                          f"top-1 agreement {agree * 100:.2f}%")
    return {"max_abs_diff": diff, "top1_agreement": agree, "samples": int(len(x))}


def model_files(onnx_path: Path) -> list[Path]:
    """The ONNX file and every external-data file it references."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    files = {onnx_path}
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                files.add(onnx_path.parent / e.value)
    return sorted(files)

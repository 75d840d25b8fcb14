"""Build a TensorRT engine from the ONNX with the TensorRT Python API (10.x as on JetPack 6, and 11.x).

NOT RUN here: TensorRT cannot be installed on this project's machines. The code follows the documented API:
- TensorRT 10: `builder.create_network(0)` (explicit batch is the only mode), precision by builder flags
  (`BuilderFlag.FP16`, `BuilderFlag.INT8` for QDQ models), `set_memory_pool_limit(WORKSPACE, …)`,
  `build_serialized_network`.
- TensorRT 11: strongly typed networks (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`): precision comes from
  the ONNX itself (fp16 casts or Q/DQ nodes); the FP16/INT8 flags are gone.
`BuilderFlag.SPARSE_WEIGHTS` only when the mask is 2:4; weights are never rewritten into 2:4 (no
`trtexec --sparsity=force`): that would overwrite the learned mask. A timing cache is kept beside the engine.
"""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path


class TensorRTUnavailable(RuntimeError):
    pass


def is_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return True


def major_version(version: str) -> int:
    return int(version.split(".")[0])


def builder_settings(trt_version: str, precision: str, sparse_24: bool, workspace_mb: int) -> dict:
    """What the build will set, by API generation (pure logic: tested without TensorRT)."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    gen = major_version(trt_version)
    flags: list[str] = []
    strongly_typed = gen >= 11
    if not strongly_typed:
        if precision == "fp16":
            flags.append("FP16")
        if precision == "int8":
            flags += ["INT8", "FP16"]  # the QDQ model sets INT8 where it has Q/DQ; FP16 elsewhere
    if sparse_24:
        flags.append("SPARSE_WEIGHTS")
    return {"generation": gen, "strongly_typed": strongly_typed, "flags": flags,
            "workspace_bytes": int(workspace_mb) << 20}


def build_engine(onnx_path: Path, engine_path: Path, precision: str = "fp16", sparse_24: bool = False,
                 workspace_mb: int = 1024, timing_cache: Path | None = None, dla_core: int | None = None) -> dict:
    if not is_available():
        raise TensorRTUnavailable("TensorRT is not available here (needs the tensorrt package and a CUDA GPU); "
                                  "the bundle's build_engine.sh builds the engine on the device instead")
    import tensorrt as trt

    s = builder_settings(trt.__version__, precision, sparse_24, workspace_mb)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 0
    if s["strongly_typed"]:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s["workspace_bytes"])
    for f in s["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, f))
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    inp = network.get_input(0)
    profile = builder.create_optimization_profile()
    c, h, w = inp.shape[1:]
    profile.set_shape(inp.name, (1, c, h, w), (32, c, h, w), (256, c, h, w))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return {"tensorrt_version": trt.__version__, **s}


def trtexec_command(onnx_name: str, engine_name: str, precision: str, sparse_24: bool, workspace_mb: int,
                    dla: bool = False, strongly_typed: bool = False, input_shape=(3, 32, 32)) -> str:
    """The trtexec line for build_engine.sh (run on the device: engines are tied to its GPU and TensorRT)."""
    args = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}",
            f"--memPoolSize=workspace:{workspace_mb}M", "--timingCacheFile=timing.cache",
            *(f"--{k}Shapes=input:{n}x{'x'.join(map(str, input_shape))}" for k, n in (("min", 1), ("opt", 32), ("max", 256)))]
    if strongly_typed:
        args.append("--stronglyTyped")
    elif precision == "fp16":
        args.append("--fp16")
    elif precision == "int8":
        args += ["--int8", "--fp16"]
    if sparse_24:
        args.append("--sparsity=enable")  # use the mask's 2:4 pattern; never --sparsity=force
    if dla:
        args += ["--useDLACore=0", "--allowGPUFallback"]
    return " ".join(shlex.quote(a) for a in args)

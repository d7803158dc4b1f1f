"""Device, precision and threads: the only place that picks them.

`pick_runtime` resolves a model_config's device and precision against the hardware found at
load time (and the precision cosines measured at registration); `apply_precision` puts a
tower there, and `TorchEngine` runs its forwards. The stages hand the engine arrays and never
ask which engine it is.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.settings import RuntimeConfig

# The cosine to fp32 a precision must have held on the sample inputs (measured at registration,
# see registry.precision.measure_precisions) to be the "default" precision.
DEFAULT_PRECISION_COSINE = 0.9999
# The cosine an int8 IR must hold on held-out calibration data to be offered as `precision: int8`.
INT8_OFFER_COSINE = 0.999


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Where and how forwards run.

    Attributes:
        engine: "torch" or "openvino".
        device: torch.device the tower lives on ("cpu", a string, for OpenVINO).
        precision: Resolved precision: "fp32", "fp16", "bf16" or "int8".
        input_dtype: dtype of floating inputs (pixel values) fed to the tower.
        autocast_dtype: dtype for torch.autocast around the forward, or None.
        batch_size: Rows per forward.
        threads: torch's intra-op threads in this process (the decode pool uses as many).
    """

    engine: str = "torch"
    device: object
    precision: str
    input_dtype: object
    autocast_dtype: object | None
    batch_size: int
    threads: int = 1

    def forward_context(self):
        """Inference mode, plus autocast when the precision asks for it."""
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        return stack


def features(output):
    """The vectors of a get_*_features call: `.pooler_output` in transformers 5, the tensor before."""
    return getattr(output, "pooler_output", output)


class TorchEngine:
    """The torch engine: a family's full model class holding one tower, on the Runtime's device and precision.

    The stages hand it numpy arrays and never ask which engine it is; each call runs one forward
    (inference mode, autocast where the precision asks for it) and returns the tower's vectors as
    a float32 numpy array (n, dim), the family's own `get_text_features` / `get_image_features`.
    """

    name = "torch"

    def __init__(self, module, runtime: Runtime):
        """Args: module: the tower, already on the runtime's device and precision (apply_precision)."""
        self.module, self.runtime = module, runtime

    def text_features(self, input_ids, attention_mask=None):
        """Token ids int64 (n, L) and, where the family takes one, their mask (n, L) -> vectors (n, dim)."""
        import torch

        device = self.runtime.device
        kwargs = {"input_ids": torch.from_numpy(input_ids).to(device)}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(attention_mask).to(device)
        with self.runtime.forward_context():
            return _numpy(features(self.module.get_text_features(**kwargs)))

    def image_features(self, pixels):
        """Pixels float32 (n, 3, H, W) -> vectors (n, dim)."""
        import torch

        batch = torch.from_numpy(pixels).to(self.runtime.device, self.runtime.input_dtype, non_blocking=True)
        with self.runtime.forward_context():
            return _numpy(features(self.module.get_image_features(pixel_values=batch)))

    def patch_features(self, patches, mask, shapes):
        """NaFlex: patch sequences float32 (n, P, D), their mask (n, P) and grid shapes (n, 2) -> vectors (n, dim)."""
        import torch

        device = self.runtime.device
        with self.runtime.forward_context():
            out = self.module.get_image_features(
                pixel_values=torch.from_numpy(patches).to(device, self.runtime.input_dtype),
                pixel_attention_mask=torch.from_numpy(mask).to(device),
                spatial_shapes=torch.from_numpy(shapes).to(device),
            )
            return _numpy(features(out))


def _numpy(tensor):
    """A torch tensor -> float32 numpy array on the CPU."""
    return tensor.float().cpu().numpy()


class OpenVINOEngine:
    """The OpenVINO engine: a tower's IR (exported at registration, artifacts.openvino) compiled for the CPU.

    The same three calls as TorchEngine, from numpy arrays to float32 numpy vectors (n, dim).
    MLflow's scoring server calls predict from several threads at once, and an infer request
    is not safe to share. Requests are therefore pooled: at most as many as the compiled model's
    OPTIMAL_NUMBER_OF_INFER_REQUESTS (one per stream; 1 under the LATENCY hint) run at once, and a
    caller that finds none idle waits for one. Each request keeps its own buffers, so the pool
    also bounds memory, however many threads call.
    """

    name = "openvino"

    def __init__(self, compiled, runtime: Runtime):
        """Args: compiled: an openvino.CompiledModel of the tower (artifacts.openvino.compile_tower)."""
        import queue

        self.compiled, self.runtime = compiled, runtime
        self._limit = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._idle: queue.Queue = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def _acquire(self):
        with self._lock:
            create = self._idle.empty() and self._made < self._limit
            self._made += create
        if not create:
            return self._idle.get()  # waits for a running request to finish
        try:
            return self.compiled.create_infer_request()
        except BaseException:
            with self._lock:
                self._made -= 1  # the slot stays free for the next caller
            raise

    def _infer(self, inputs: dict):
        import numpy as np

        request = self._acquire()
        try:
            request.infer(inputs)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32)
        finally:
            self._idle.put(request)

    def text_features(self, input_ids, attention_mask=None):
        """Token ids int64 (n, L) and, where the family takes one, their mask (n, L) -> vectors (n, dim)."""
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return self._infer(inputs)

    def image_features(self, pixels):
        """Pixels float32 (n, 3, H, W) -> vectors (n, dim)."""
        return self._infer({"pixel_values": pixels})

    def patch_features(self, patches, mask, shapes):
        """NaFlex: patch sequences float32 (n, P, D), their mask (n, P) and grid shapes (n, 2) -> vectors (n, dim)."""
        return self._infer({"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes})


def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags as /proc/cpuinfo lists them (("unknown", {}) elsewhere)."""
    model, flags = "unknown", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity on Linux, else all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class CpuCapabilities:
    """The CPU instructions that decide which engine-and-precision pairs run natively.

    Attributes:
        native_bf16: bf16 dot products (AVX512_BF16 or AMX-BF16). Without them bf16 is emulated
            (torch) or refused (OpenVINO), and never the default.
        int8_dot: int8 dot products (AVX512_VNNI, AVX-VNNI or AMX-INT8). Without them OpenVINO's
            int8 ran slower than its fp32 on ViT-B/32 (docs/BENCHMARKS.md, "Engines").
    """

    native_bf16: bool
    int8_dot: bool


def cpu_capabilities() -> CpuCapabilities:
    """What this CPU runs natively, from its /proc/cpuinfo flags.

    The one place the package reads the CPU's instruction sets: every precision rule asks this
    function (directly or through cpu_has_native_bf16 / cpu_has_int8_dot), so a test states the
    hardware it assumes by replacing it (tests/conftest.py, `cpu`).
    """
    flags = cpu_info()[1]
    return CpuCapabilities(native_bf16=bool({"avx512_bf16", "amx_bf16"} & flags),
                           int8_dot=bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags))


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (see cpu_capabilities)."""
    return cpu_capabilities().int8_dot


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (see cpu_capabilities)."""
    return cpu_capabilities().native_bf16


# Engine-and-precision pairs, fastest first, as measured on ViT-B/32 shapes (docs/BENCHMARKS.md,
# "Engines"): "default" takes the first one the hardware runs natively that held
# DEFAULT_PRECISION_COSINE to torch fp32 at registration.
CPU_SPEED_ORDER = (("openvino", "int8"), ("openvino", "bf16"), ("torch", "bf16"), ("openvino", "fp32"),
                   ("torch", "fp32"))
CUDA_SPEED_ORDER = (("torch", "fp16"), ("torch", "bf16"), ("torch", "fp32"))


@functools.lru_cache(maxsize=1)
def torch_available() -> bool:
    """True where torch imports (a model logged for the OpenVINO engine alone is served without it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def pick_runtime(config: RuntimeConfig, measured: dict[str, dict[str, float]] | None = None,
                 engines: frozenset[str] = frozenset({"torch"})):
    """Resolve engine, device, precision and threads from the config and the hardware found now.

    Args:
        config: The model_config.
        measured: Per engine, per precision, the lowest cosine to torch fp32 measured on sample
            inputs at registration ({"torch": {"bf16": ...}, "openvino": {"fp32": ...}}); torch fp32
            is the reference and is never listed.
        engines: The engines this artifact and environment can run ("torch" where torch imports,
            "openvino" where the artifact holds IR and openvino imports).

    "default" is the first pair of CPU_SPEED_ORDER (CUDA_SPEED_ORDER on CUDA) that this hardware
    runs natively, that `config.engine` allows, and that held a cosine of at least
    DEFAULT_PRECISION_COSINE: OpenVINO int8 where it held that much (VNNI or AMX CPUs), then bf16 on CPUs with
    AVX512_BF16 or AMX (OpenVINO, then torch), then OpenVINO fp32, then torch fp32. Without a
    measurement it is torch fp32 on CPU and fp16 on CUDA. int8 counts only on CPUs with int8
    dot products (VNNI or AMX): without them it measured slower than fp32. An explicit precision with engine
    "auto" runs on OpenVINO where that pair held the same cosine, on torch otherwise.
    `num_threads`, when set, becomes torch's intra-op thread count and OpenVINO's inference threads.

    Returns:
        A Runtime.

    Raises:
        ModelLoadError: CUDA asked for but absent, a precision the device cannot run, or an
            engine this artifact or environment lacks (OpenVINO on CUDA, torch where it is not installed).
    """
    measured = measured or {}
    has_torch = "torch" in engines
    if config.engine == "torch" and not has_torch:
        raise ModelLoadError("engine 'torch' asked for, but torch is not installed here or the model was logged "
                             "for OpenVINO alone (no torch weights); use engine 'openvino' or 'auto'")
    if config.engine == "openvino" and "openvino" not in engines:
        raise ModelLoadError("engine 'openvino' asked for, but this model has no OpenVINO IR or openvino is "
                             f"not installed; engines available here: {sorted(engines) or 'none'}")
    if config.engine == "openvino" and config.device.startswith("cuda"):
        raise ModelLoadError(f"engine 'openvino' runs on CPU; use device 'cpu' or 'auto', not {config.device!r}")
    cuda = _wants_cuda(config, has_torch)
    allowed = engines if config.engine == "auto" else frozenset({config.engine})
    precision, engine = config.precision, None
    if precision == "default":
        engine, precision = _default_pair(cuda, measured, allowed)
    elif precision == "auto":
        if cuda:
            import torch

            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if engine is None:
        engine = _engine_for(precision, cuda, measured, allowed, config.engine)
    if precision == "fp16" and not cuda:
        raise ModelLoadError("precision 'fp16' needs a CUDA device; on CPU choose 'fp32', 'bf16', 'int8' or 'auto'")
    if precision == "int8" and cuda:
        raise ModelLoadError("precision 'int8' runs on CPU only; on CUDA choose 'fp16' or 'bf16'")
    if engine == "openvino" and config.device.startswith("cuda"):
        raise ModelLoadError(f"device {config.device!r} needs the torch engine, and this model runs on OpenVINO here "
                             f"(torch {'has no weights in it' if has_torch else 'is not installed'}); "
                             "use device 'cpu' or 'auto'")
    if engine == "openvino" and precision == "bf16" and not cpu_has_native_bf16():
        raise ModelLoadError("precision 'bf16' on engine 'openvino' needs a CPU with AVX512_BF16 or AMX, and this "
                             "one has neither; choose precision 'fp32', or engine 'torch' (emulated bf16)")
    if engine == "openvino" and precision == "int8":
        held = measured.get("openvino", {}).get("int8")
        if held is None or held < INT8_OFFER_COSINE:
            why = ("none was made: register with --int8, or registry.int8 in the settings" if held is None
                   else f"it held {held}")
            raise ModelLoadError(f"precision 'int8' on OpenVINO needs an int8 IR that held cosine >= "
                                 f"{INT8_OFFER_COSINE} at registration ({why}); choose 'fp32', or engine 'torch' "
                                 "for dynamic int8")
    if engine == "openvino":  # torch is not imported for it: a torch-free model must not need it
        threads = config.num_threads or cpu_count()
        return Runtime(engine="openvino", device="cpu", precision=precision, input_dtype=None, autocast_dtype=None,
                       batch_size=config.batch_size, threads=threads)
    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    threads = torch.get_num_threads()
    device = torch.device(("cuda" if config.device == "auto" else config.device) if cuda else "cpu")
    return Runtime(
        engine="torch", device=device, precision=precision, input_dtype=torch.float16 if precision == "fp16"
        else torch.float32, autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        batch_size=config.batch_size, threads=threads,
    )


def _wants_cuda(config: RuntimeConfig, has_torch: bool) -> bool:
    """Whether the forwards run on CUDA (never for the OpenVINO engine)."""
    if config.engine == "openvino" or not has_torch:
        return False
    import torch

    if config.device == "auto":
        return torch.cuda.is_available()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {config.device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return config.device.startswith("cuda")


def _default_pair(cuda: bool, measured: dict[str, dict[str, float]], allowed: frozenset[str]) -> tuple[str, str]:
    """The "default" (engine, precision): see pick_runtime."""
    if cuda:
        import torch

        found = measured.get("torch", {})
        if not found or "fp16" not in found:  # nothing measured for CUDA (registered on a CPU): keep fp16
            return "torch", "fp16"
        native = {"fp16", "fp32"} | ({"bf16"} if torch.cuda.is_bf16_supported() else set())
        order = [pair for pair in CUDA_SPEED_ORDER if pair[1] in native]
    else:
        native = {"fp32"} | ({"bf16"} if cpu_has_native_bf16() else set()) | ({"int8"} if cpu_has_int8_dot() else set())
        order = [pair for pair in CPU_SPEED_ORDER if pair[1] in native]
    for engine, precision in order:
        if engine not in allowed:
            continue
        if precision == "fp32" and engine == "torch":
            return engine, precision
        if measured.get(engine, {}).get(precision, 0.0) >= DEFAULT_PRECISION_COSINE:
            return engine, precision
    return ("torch", "fp32") if "torch" in allowed else ("openvino", "fp32")


def _engine_for(precision: str, cuda: bool, measured: dict, allowed: frozenset[str], asked: str) -> str:
    """The engine for an explicit precision: the one asked for, else OpenVINO where that pair held."""
    if asked != "auto":
        return asked
    if precision == "bf16" and not cpu_has_native_bf16():
        return "torch"  # OpenVINO refuses bf16 without native support; torch emulates it
    if not cuda and "openvino" in allowed and precision != "fp16":
        bar = INT8_OFFER_COSINE if precision == "int8" else DEFAULT_PRECISION_COSINE
        held = measured.get("openvino", {}).get(precision, 0.0) >= bar
        if held or "torch" not in allowed:
            return "openvino"
    return "torch"


def apply_precision(model, runtime):
    """Move a tower to its device and precision (fp16 weights, int8 dynamic quantisation)."""
    import torch

    if runtime.precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if runtime.precision == "fp16":
        model = model.half()
    return model.to(runtime.device)

"""Device, precision and threads: the only place that picks them.

`pick_runtime` resolves a model_config's device and precision against the hardware found at
load time (and the precision cosines measured at registration); `apply_precision` puts a
tower there, and `TorchEngine` runs its forwards. The stages hand the engine arrays and never
ask which engine it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.settings import RuntimeConfig

# The cosine to fp32 a precision must have held on the sample inputs (measured at registration,
# see registry.precision.measure_precisions) to be the "default" precision.
DEFAULT_PRECISION_COSINE = 0.9999


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Where and how forwards run.

    Attributes:
        device: torch.device the tower lives on.
        precision: Resolved precision: "fp32", "fp16", "bf16" or "int8".
        input_dtype: dtype of floating inputs (pixel values) fed to the tower.
        autocast_dtype: dtype for torch.autocast around the forward, or None.
        batch_size: Rows per forward.
        threads: torch's intra-op threads in this process (the decode pool uses as many).
    """

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
    an fp32 torch tensor (n, dim), the family's own `get_text_features` / `get_image_features`.
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
            return features(self.module.get_text_features(**kwargs)).float()

    def image_features(self, pixels):
        """Pixels float32 (n, 3, H, W) -> vectors (n, dim)."""
        import torch

        batch = torch.from_numpy(pixels).to(self.runtime.device, self.runtime.input_dtype, non_blocking=True)
        with self.runtime.forward_context():
            return features(self.module.get_image_features(pixel_values=batch)).float()

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
            return features(out).float()


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


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
    flags = cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_runtime(config: RuntimeConfig, measured: dict[str, float] | None = None):
    """Resolve device, precision and threads from the config and the hardware found now.

    `num_threads`, when set, becomes torch's intra-op thread count for the process.

    "default" is the fastest precision this hardware runs natively that held a cosine of at
    least DEFAULT_PRECISION_COSINE to fp32 on the sample inputs measured at registration
    (`measured`, from the artifact): bf16 on CPUs with AVX512_BF16 or AMX, else fp32; on CUDA
    fp16, else bf16, else fp32. Without a measurement it is fp32 on CPU and fp16 on CUDA.

    Raises:
        ModelLoadError: CUDA asked for but absent, or a precision the device cannot run.
    """
    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {config.device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    else:
        device = torch.device(config.device)
    cuda = device.type == "cuda"
    precision = config.precision
    if precision == "default":
        precision = _default_precision(cuda, measured)
    elif precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ModelLoadError("precision 'fp16' needs a CUDA device; on CPU choose 'fp32', 'bf16', 'int8' or 'auto'")
    if precision == "int8" and cuda:
        raise ModelLoadError("precision 'int8' (dynamic quantisation) runs on CPU only; on CUDA choose 'fp16' or 'bf16'")
    input_dtype = torch.float16 if precision == "fp16" else torch.float32
    autocast = torch.bfloat16 if precision == "bf16" else None
    return Runtime(
        device=device, precision=precision, input_dtype=input_dtype,
        autocast_dtype=autocast, batch_size=config.batch_size, threads=torch.get_num_threads(),
    )


def _default_precision(cuda: bool, measured: dict[str, float] | None) -> str:
    import torch

    if not measured:
        return "fp16" if cuda else "fp32"
    if cuda:
        if "fp16" not in measured:  # registered on a CPU: nothing measured for CUDA, keep fp16
            return "fp16"
        native = ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    else:
        native = ["bf16"] if cpu_has_native_bf16() else []
    held = [p for p in native if measured.get(p, 0.0) >= DEFAULT_PRECISION_COSINE]
    return held[0] if held else "fp32"


def apply_precision(model, runtime):
    """Move a tower to its device and precision (fp16 weights, int8 dynamic quantisation)."""
    import torch

    if runtime.precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if runtime.precision == "fp16":
        model = model.half()
    return model.to(runtime.device)

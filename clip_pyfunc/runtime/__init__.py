"""Engine, device, precision and threads: the only place that picks them.

`pick_runtime` resolves a model_config against the hardware found at load time (read through
`cpu_capabilities` and `cuda_available`) and the fidelity measured at registration. The engines
themselves are adapters in `runtime.engines`, one module each; the stages hand an engine arrays
and never ask which engine it is.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

from clip_pyfunc.errors import ModelLoadError

# The cosine to fp32 a precision must have held on the sample inputs (measured at registration,
# see registry.precision.measure_fidelity) to be the "default" precision.
DEFAULT_PRECISION_COSINE = 0.9999
# The cosine an int8 IR must hold on held-out calibration data to be offered as `precision: int8`.
INT8_OFFER_COSINE = 0.999
# How much faster than the fixed order's choice a pair must have run, timed on this machine at registration
# (registry.speed), to be the default instead: the machine drifts about 10% between minutes (interleaved rounds
# take most of it out), and the fixed order's choice is the torch-free one where OpenVINO leads it.
MEASURED_MARGIN = 1.1


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Where and how forwards run.

    Attributes:
        engine: The engine's name (a key of runtime.engines.ENGINES).
        device: torch.device the tower lives on ("cpu", a string, for OpenVINO).
        precision: Resolved precision: "fp32", "fp16", "bf16" or "int8".
        input_dtype: dtype of floating inputs (pixel values) fed to the tower.
        autocast_dtype: dtype for torch.autocast around the forward, or None.
        batch_size: Rows per forward.
        threads: torch's intra-op threads in this process (the decode pool uses as many).
    """

    engine: str
    device: object
    precision: str
    input_dtype: object
    autocast_dtype: object | None
    batch_size: int
    threads: int = 1


def features(output):
    """The vectors of a get_*_features call: `.pooler_output` in transformers 5, the tensor before."""
    return getattr(output, "pooler_output", output)


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


def hardware_id() -> str | None:
    """This machine as registration's speed measurements name it (registry.speed): the architecture, the CPU's
    model name, the CPUs this process may use and its native bf16 and int8 dot products; two machines with the
    same id are taken to rank the engines alike. None where the CPU's model name is unknown (no /proc/cpuinfo
    "model name", as on ARM and macOS): such a machine's rates apply nowhere."""
    import platform

    model = cpu_info()[0]
    if model == "unknown":
        return None
    caps = cpu_capabilities()
    return (f"{platform.machine()} {model} | {cpu_count()} CPUs | native bf16 {caps.native_bf16} | "
            f"int8 dot {caps.int8_dot}")


@functools.lru_cache(maxsize=1)
def torch_available() -> bool:
    """True where torch imports (a model logged for a torch-free engine is served without it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# Device files a GPU driver makes: NVIDIA's (Linux, containers), NVIDIA Jetson's (Tegra), ROCm's
# (torch.cuda runs on it) and WSL 2's GPU paravirtualisation. A GPU reached otherwise is not seen
# unless one of them exists.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvhost-ctrl-gpu", "/dev/nvmap", "/dev/kfd", "/dev/dxg")


def cuda_available() -> bool:
    """True where torch imports and sees a CUDA device: the one place the package asks for one.

    Where no GPU driver's device file exists (GPU_DEVICE_FILES; Linux only), the answer is False
    without importing torch: a model whose engine needs no torch then loads without it (torch's
    import is about 1.5 s of one core and 300 MB of address space).
    """
    if not torch_available():
        return False
    if sys.platform == "linux" and not any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


def cuda_has_bf16() -> bool:
    """True when the CUDA device runs bf16 natively."""
    import torch

    return torch.cuda.is_bf16_supported()


# The precisions each device kind runs at all, whatever the engine.
DEVICE_PRECISIONS = {"cpu": ("fp32", "bf16", "int8"), "cuda": ("fp32", "fp16", "bf16")}


def native_precisions(device: str) -> set[str]:
    """The precisions this hardware runs natively on a device kind: fp32 always; bf16 with AVX512_BF16 or AMX
    (CPU) or a bf16-capable GPU; int8 on CPUs with int8 dot products (without them it measured slower than
    fp32); fp16 on CUDA."""
    if device == "cuda":
        return {"fp32", "fp16"} | ({"bf16"} if cuda_has_bf16() else set())
    return {"fp32"} | ({"bf16"} if cpu_has_native_bf16() else set()) | ({"int8"} if cpu_has_int8_dot() else set())


def pick_engine(config, measured: dict[str, dict[str, float]] | None = None,
                engines: frozenset[str] = frozenset({"torch"}), speeds: dict[str, dict[str, float]] | None = None):
    """Resolve engine, device and precision from the config and the hardware found now, without
    making the Runtime (a torch Runtime imports torch; pick_runtime makes it).

    Args:
        config: The model_config (settings.RuntimeConfig; that room sits above this one).
        measured: Per engine, per precision, the lowest cosine to the reference (torch fp32)
            measured on sample inputs at registration ({"torch": {"bf16": ...}, "openvino": {"fp32": ...}},
            CheckpointInfo.fidelity); the reference itself is never listed.
        engines: The engines this artifact and environment can run (names in runtime.engines.ENGINES).
        speeds: {engine: {precision: rows/s}} this tower ran at on this machine at registration
            (CheckpointInfo.speeds_here), or None.

    "default" is the fastest pair that this hardware runs natively (`native_precisions`), that
    `config.engine` allows, and that held a cosine of at least DEFAULT_PRECISION_COSINE; the
    reference pair needs no measurement. Fastest means by each engine's fixed `speed` ranks, unless
    `speeds` (measured on this CPU) has a pair that ran MEASURED_MARGIN times the fixed choice's rate
    or faster (or the fixed choice has no rate: its timing failed): then the fastest measured. The
    fixed ranks, on CPUs: OpenVINO int8 where it held that much (VNNI or AMX CPUs), then bf16 on CPUs
    with AVX512_BF16 or AMX (OpenVINO, then torch), then OpenVINO fp32, then torch fp32. An engine's
    `unmeasured_default` applies where that precision was never measured (fp16 on CUDA for a
    model registered on a CPU). An explicit precision with engine "auto" runs on the fastest
    engine where that pair held its bar (INT8_OFFER_COSINE for int8), on the reference engine
    otherwise. `num_threads`, when set, becomes the engine's thread count (in pick_runtime).

    Returns:
        (engine class, precision, on CUDA).

    Raises:
        ModelLoadError: CUDA asked for but absent, a precision the device cannot run, or an
            engine this artifact or environment lacks, or one that refuses the precision here.
    """
    from clip_pyfunc.runtime.engines import ENGINES, engine_class

    measured = measured or {}
    here = ", ".join(sorted(engines)) or "none"
    if config.engine != "auto":
        asked = engine_class(config.engine)
        if config.engine not in engines:
            raise ModelLoadError(f"engine {config.engine!r} asked for, but {asked.absent}; engines available "
                                 f"here: {here}; use one of them or 'auto'")
        if config.device.startswith("cuda") and "cuda" not in asked.devices:
            raise ModelLoadError(f"engine {config.engine!r} runs on {'/'.join(d.upper() for d in asked.devices)}; "
                                 f"use device 'cpu' or 'auto', not {config.device!r}")
    allowed = [engine_class(name) for name in ENGINES
               if name in engines and config.engine in ("auto", name)]
    if not allowed:
        raise ModelLoadError(f"no engine can run this model here (engines available here: {here})")
    cuda = _wants_cuda(config, allowed)
    device = "cuda" if cuda else "cpu"
    precision, engine = config.precision, None
    if precision == "default":
        engine, precision = _default_pair(device, measured, allowed, speeds if device == "cpu" else None)
    elif precision == "auto":
        precision = "bf16" if "bf16" in native_precisions(device) else ("fp16" if cuda else "fp32")
    if precision not in DEVICE_PRECISIONS[device]:
        raise ModelLoadError(
            "precision 'fp16' needs a CUDA device; on CPU choose 'fp32', 'bf16', 'int8' or 'auto'" if not cuda
            else f"precision {precision!r} runs on CPU only; on CUDA choose 'fp16' or 'bf16'")
    chosen = engine_class(engine) if engine else _engine_for(precision, device, measured, allowed)
    if device not in chosen.devices or (config.device.startswith("cuda") and not cuda):
        cuda_engines = [name for name in ENGINES if "cuda" in engine_class(name).devices]
        raise ModelLoadError(f"device {config.device!r} needs an engine that runs on CUDA ({', '.join(cuda_engines)}), "
                             f"and this model runs on {chosen.name} here (engines available here: {here}); "
                             "use device 'cpu' or 'auto'")
    refusal = chosen.refusal(precision, measured.get(chosen.name, {}))
    if refusal:
        raise ModelLoadError(refusal)
    return chosen, precision, cuda


def pick_runtime(config, measured: dict[str, dict[str, float]] | None = None,
                 engines: frozenset[str] = frozenset({"torch"}), speeds: dict[str, dict[str, float]] | None = None):
    """The Runtime for the engine, device and precision pick_engine chooses (see there).

    Returns:
        A Runtime.

    Raises:
        ModelLoadError: As pick_engine.
    """
    chosen, precision, cuda = pick_engine(config, measured, engines, speeds)
    return chosen.make_runtime(config, precision, cuda)


def _wants_cuda(config, allowed: list) -> bool:
    """Whether the forwards run on CUDA: asked for (or "auto" and present) and an allowed engine runs there."""
    if not any("cuda" in engine.devices for engine in allowed):
        return False
    if config.device == "auto":
        return cuda_available()
    if config.device.startswith("cuda") and not cuda_available():
        raise ModelLoadError(f"device {config.device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return config.device.startswith("cuda")


def default_candidates(device: str, measured: dict[str, dict[str, float]], allowed: list) -> list[tuple]:
    """The (engine class, precision) pairs "default" may take on a device kind, in the engines' fixed order
    (Engine.speed, fastest first): a precision ranked by one of the `allowed` engine classes, native here
    (`native_precisions`), and the reference pair or one that held DEFAULT_PRECISION_COSINE in `measured` and
    that the engine does not refuse. registry.speed times these; _default_pair picks among them."""
    from clip_pyfunc.runtime.engines import REFERENCE

    native = native_precisions(device)
    ranked = sorted(((rank, engine, precision) for engine in allowed
                     for precision, rank in engine.speed.get(device, {}).items() if precision in native),
                    key=lambda item: -item[0])
    out = []
    for _, engine, precision in ranked:
        held = measured.get(engine.name, {})
        if (engine.name, precision) == REFERENCE or (
                held.get(precision, 0.0) >= DEFAULT_PRECISION_COSINE and engine.refusal(precision, held) is None):
            out.append((engine, precision))
    return out


def _default_pair(device: str, measured: dict[str, dict[str, float]], allowed: list,
                  speeds: dict[str, dict[str, float]] | None = None) -> tuple[str, str]:
    """The "default" (engine, precision): see pick_engine."""
    from clip_pyfunc.runtime.engines import REFERENCE

    for engine in allowed:
        unmeasured = engine.unmeasured_default.get(device)
        if unmeasured and measured.get(engine.name, {}).get(unmeasured) is None:
            return engine.name, unmeasured
    eligible = [(engine.name, precision) for engine, precision in default_candidates(device, measured, allowed)]
    if not eligible:
        names = [engine.name for engine in allowed]
        return REFERENCE if REFERENCE[0] in names else (names[0], "fp32")
    fixed, rates = eligible[0], speeds or {}
    timed = [pair for pair in eligible if rates.get(pair[0], {}).get(pair[1])]
    if not timed:
        return fixed
    fastest = max(timed, key=lambda pair: rates[pair[0]][pair[1]])  # a tie keeps the fixed order
    base = rates.get(fixed[0], {}).get(fixed[1])
    return fastest if not base or rates[fastest[0]][fastest[1]] >= MEASURED_MARGIN * base else fixed


def _engine_for(precision: str, device: str, measured: dict, allowed: list):
    """The engine class for an explicit precision: the fastest allowed one that runs it, does not refuse it
    and held its bar (or is the reference engine); else the first allowed."""
    bar = INT8_OFFER_COSINE if precision == "int8" else DEFAULT_PRECISION_COSINE
    able = [engine for engine in allowed if precision in engine.runs.get(device, ())
            and engine.refusal(precision, measured.get(engine.name, {})) is None]
    able.sort(key=lambda engine: -engine.speed.get(device, {}).get(precision, 0))
    for engine in able:
        if engine.offers(precision, measured.get(engine.name, {}), bar):
            return engine
    return able[0] if able else allowed[0]

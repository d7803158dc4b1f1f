"""The OpenVINO engine: a tower's IR (exported at registration, artifacts.openvino) compiled for the CPU."""

from __future__ import annotations

import os
import sys
import threading

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.runtime.engines import Engine

IR_FILE = "openvino_model.xml"  # a tower artifact's fp32 IR (artifacts.openvino writes it at registration)
IR_INT8_FILE = "openvino_model_int8.xml"  # the image tower's int8 IR (registry.quantize)


class OpenVINOEngine(Engine):
    """A tower's IR compiled for the CPU (compile_tower); runs without torch.

    The same three calls as every engine, from numpy arrays to float32 numpy vectors (n, dim).
    MLflow's scoring server calls predict from several threads at once, and an infer request
    is not safe to share. Requests are therefore pooled: at most as many as the compiled model's
    OPTIMAL_NUMBER_OF_INFER_REQUESTS (one per stream; 1 under the LATENCY hint) run at once, and a
    caller that finds none idle waits for one. Each request keeps its own buffers, so the pool
    also bounds memory, however many threads call.

    Precisions: fp32 (f32 inference), bf16 (only on CPUs with native bf16: OpenVINO refuses to
    emulate it) and int8 (the image tower's NNCF IR from `register --int8`, where it held
    INT8_OFFER_COSINE at registration; the text tower stays fp32).
    """

    name = "openvino"
    devices = ("cpu",)
    runs = {"cpu": ("fp32", "bf16", "int8")}
    speed = {"cpu": {"int8": 50, "bf16": 40, "fp32": 20}}
    required_precision = "fp32"
    torch_free = True
    batch_wait_ms = 0.0  # 11.9 images/s at 1 row and 13.1 at 32 on ViT-B/32 (docs/SERVING.md): waiting does not pay
    exporter = "clip_pyfunc.artifacts.openvino"
    absent = "this model has no OpenVINO IR or openvino is not installed"
    files = (IR_FILE, IR_FILE[:-4] + ".bin", IR_INT8_FILE, IR_INT8_FILE[:-4] + ".bin")

    def __init__(self, compiled, runtime):
        """Args: compiled: an openvino.CompiledModel of the tower (compile_tower)."""
        import queue

        self.compiled, self.runtime = compiled, runtime
        self._limit = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._idle: queue.Queue = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()
        self.weights_file: str | None = None  # the IR's .bin, released after the first forward (load sets it)

    @classmethod
    def unusable(cls, artifact_dir: str, tower: str) -> str | None:
        """None where openvino imports and the artifact holds the tower's IR."""
        if not os.path.exists(ir_path(artifact_dir)):
            return (f"the {tower} artifact has no OpenVINO IR ({IR_FILE}): it was registered without engines, or "
                    f"with the files of the engine it runs on by default alone; register with --all-engine-files "
                    f"(registry.engine_files: all) to run it on OpenVINO too"
                    + ("" if openvino_available() else " (openvino is not installed)"))
        if not openvino_available():
            return "openvino is not installed"
        return None

    @classmethod
    def refusal(cls, precision: str, measured: dict[str, float]) -> str | None:
        """bf16 without native bf16, or int8 without an int8 IR that held INT8_OFFER_COSINE."""
        from clip_pyfunc.runtime import INT8_OFFER_COSINE, cpu_has_native_bf16

        if precision == "bf16" and not cpu_has_native_bf16():
            return ("precision 'bf16' on engine 'openvino' needs a CPU with AVX512_BF16 or AMX, and this one has "
                    "neither; choose precision 'fp32', or engine 'torch' (emulated bf16)")
        if precision == "int8":
            held = measured.get("int8")
            if held is None or held < INT8_OFFER_COSINE:
                why = ("none was made: register with --int8, or registry.int8 in the settings" if held is None
                       else f"it held {held}")
                return (f"precision 'int8' on OpenVINO needs an int8 IR that held cosine >= {INT8_OFFER_COSINE} at "
                        f"registration ({why}); choose 'fp32', or engine 'torch' for dynamic int8")
        return None

    @classmethod
    def make_runtime(cls, config, precision: str, cuda: bool):
        """CPU, and `num_threads` (else every CPU this process may use) inference threads; torch is not imported."""
        from clip_pyfunc.runtime import Runtime, cpu_count

        return Runtime(engine=cls.name, device="cpu", precision=precision, input_dtype=None, autocast_dtype=None,
                       batch_size=config.batch_size, threads=config.num_threads or cpu_count())

    @classmethod
    def load(cls, artifact_dir: str, tower: str, runtime, loaded=None):
        """Compile the tower's IR; int8 runs the int8 IR where the artifact has one (the image tower), else fp32."""
        import dataclasses

        if runtime.precision == "int8" and not os.path.exists(ir_path(artifact_dir, "int8")):
            runtime = dataclasses.replace(runtime, precision="fp32")  # only the image tower is quantized
        engine = cls(compile_tower(artifact_dir, runtime.precision, runtime.threads), runtime)
        engine.weights_file = os.path.splitext(ir_path(artifact_dir, runtime.precision))[0] + ".bin"
        return engine

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
            out = np.array(request.get_output_tensor(0).data, dtype=np.float32)
        finally:
            self._idle.put(request)
        if self.weights_file is not None:
            self._release_weights_file()
        return out

    def _release_weights_file(self) -> None:
        """Once, after the first forward: the plugin has packed its own copy of every weight by then."""
        with self._lock:
            path, self.weights_file = self.weights_file, None
        if path:
            release_file_pages(path)

    def text_features(self, input_ids, attention_mask=None):
        """Token ids int64 (n, L) and, where the family takes one, their mask (n, L) -> vectors (n, dim).

        The rows are padded to bucket_rows(n) with copies of the first row, whose vectors are dropped: the
        CPU plugin keeps state for every input shape it meets (about 0.7 MiB each on ViT-B/32's text tower,
        which CPU_RUNTIME_CACHE_CAPACITY bounds only in part), and text varies in rows and length. With the length in
        multiples of 8 (stages.preprocess.TextSpec.length_step) and rows in buckets, 1,000 forwards of
        random shapes (68 distinct) grew RSS 1.05x over 100 forwards, against 2.95x unpadded (815 shapes)
        and 1.43x with the length step alone (docs/BENCHMARKS.md, issue 39).
        """
        import numpy as np

        rows = len(input_ids)
        padded = bucket_rows(rows)
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if padded > rows:
            inputs = {k: np.concatenate([v, np.repeat(v[:1], padded - rows, axis=0)]) for k, v in inputs.items()}
        return self._infer(inputs)[:rows]

    def image_features(self, pixels):
        """Pixels float32 (n, 3, H, W) -> vectors (n, dim)."""
        return self._infer({"pixel_values": pixels})

    def patch_features(self, patches, mask, shapes):
        """NaFlex: patch sequences float32 (n, P, D), their mask (n, P) and grid shapes (n, 2) -> vectors (n, dim)."""
        return self._infer({"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes})


def bucket_rows(rows: int) -> int:
    """The rows a text batch of `rows` is padded to: the next power of two up to 8, then the next multiple
    of 8 (1, 2, 4, 8, 16, 24, 32...): seven row counts up to a batch of 32, at most 7 padded rows."""
    return 1 << max(0, rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8


def ir_path(artifact_dir: str, precision: str = "fp32") -> str:
    """Where a tower artifact keeps its IR ("int8": the quantized image tower)."""
    return os.path.join(artifact_dir, IR_INT8_FILE if precision == "int8" else IR_FILE)


def openvino_available() -> bool:
    """True where the openvino package imports."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def compile_tower(artifact_dir: str, precision: str, threads: int, ir: str | None = None):
    """Compile a tower artifact's IR for the CPU.

    Args:
        artifact_dir: The tower artifact.
        precision: "fp32" (f32 inference, also on CPUs where OpenVINO would pick bf16 by itself),
            "bf16" (bf16 inference precision) or "int8" (the int8 IR where the artifact has one,
            the fp32 IR otherwise: only the image tower is quantized).
        threads: OpenVINO's inference threads.
        ir: Another IR file to compile instead (registration measures candidate weight storages so).

    Returns:
        An openvino.CompiledModel, with the LATENCY hint: one stream that gives each forward every
        thread, as torch does; concurrent requests each run on their own infer request.

    Raises:
        ModelLoadError: The IR is missing or cannot be read or compiled.
    """
    import openvino as ov

    path = ir or ir_path(artifact_dir, precision)
    if precision == "int8" and not os.path.exists(path):
        path = ir_path(artifact_dir)
    if not os.path.exists(path):
        raise ModelLoadError(f"no OpenVINO IR in {artifact_dir} ({os.path.basename(path)})")
    # The precision hint is always explicit: left out, OpenVINO's CPU plugin reads the hardware
    # itself and runs bf16 on AVX512_BF16/AMX CPUs, so an "fp32" tower would silently be bf16 there.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads),
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "ENABLE_CPU_PINNING": cpu_pinning(int(threads))}
    try:
        return ov.Core().compile_model(path, "CPU", config)
    except Exception as e:  # noqa: BLE001 - openvino raises RuntimeError subclasses with no common base
        raise ModelLoadError(f"cannot compile the OpenVINO IR {path}: {first_line(e)}") from e


MADV_PAGEOUT = 21  # Linux >= 5.4, include/uapi/asm-generic/mman-common.h (Python's mmap module lacks it)


def release_file_pages(path: str) -> int:
    """Reclaim the resident pages of every read-only mapping of `path` in this process (Linux `madvise`
    MADV_PAGEOUT); the mappings stay valid, and a page read again comes back from the file.

    OpenVINO maps an IR's `.bin` into the process (ENABLE_MMAP) and its CPU plugin keeps the mapping
    for the compiled model's life, while it packs its own copy of each weight (bf16, or a blocked
    layout) on the first forward. The mapped file stayed resident beside that copy: ViT-B/32's image
    IR (334 MiB) compiled bf16 held 640 MiB after a batch of 1 and one of 32, 306 MiB once its pages
    were released, and 343 MiB after forwards at five more batch sizes (docs/BENCHMARKS.md, issue 39).
    Only shared, read-only mappings are touched: their pages are clean, so reclaiming them loses
    nothing. Elsewhere (not Linux, or a kernel without MADV_PAGEOUT) nothing happens.

    Returns:
        Bytes of the mappings advised (0 where none was found or madvise refused).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return 0
    real = os.path.realpath(path)
    spans = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == real and fields[1].startswith("r-"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end - start))
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(size for start, size in spans if libc.madvise(start, size, MADV_PAGEOUT) == 0)


def cpu_pinning(threads: int) -> bool:
    """Whether OpenVINO may pin its `threads` inference threads to cores: only where they take
    every CPU this process may use.

    OpenVINO's CPU plugin pins a process's threads to the first cores of its affinity
    (ENABLE_CPU_PINNING, on by default on Linux), without knowing of other processes. Spark's
    Python workers run one thread each on a 2-core machine, so both were pinned to core 0: two
    1-thread ViT-B/32 bf16 forwards ran 24 img/s each side by side, against 55 img/s each
    unpinned (docs/SPARK.md, issue 40). Over every core, pinning changed nothing measurable
    (93.5-98.7 img/s pinned, 98.7-100.9 unpinned, 2 threads), so it is kept there.
    """
    from clip_pyfunc.runtime import cpu_count

    return threads >= cpu_count()


def first_line(error: Exception) -> str:
    """An exception's first non-empty line, shortened (OpenVINO's messages run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__

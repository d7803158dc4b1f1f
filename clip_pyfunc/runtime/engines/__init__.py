"""Engines: what runs a tower's forward, one module per engine and one mapping from name to class.

An engine class says what it can run (`devices`, `runs`, `speed`, `refusal`; registration
measures every precision it runs on the registering device and does not refuse), whether this
artifact and environment have it (`unusable`), and how it loads a tower (`load`) and runs a batch (`text_features`, `image_features`, `patch_features`: numpy
in, float32 numpy vectors (n, dim) out). `runtime.pick_runtime` picks the (engine, precision)
pair from the hardware and the fidelity measured at registration; nothing else tests an
engine's name. Each engine that needs its own files in a tower artifact names its exporter
(`exporter`, a module in clip_pyfunc.artifacts with `export(info, towers, references)`, which
artifacts.towers.export_engine_files calls at registration).

Adding an engine: one module here with its class, one exporter in clip_pyfunc.artifacts where it
needs files of its own, and one entry in ENGINES.
"""

from __future__ import annotations

import importlib

# name -> "module:class"; the classes are imported on first use (clip_pyfunc.settings reads the names).
ENGINES = {
    "torch": "clip_pyfunc.runtime.engines.torch_engine:TorchEngine",
    "openvino": "clip_pyfunc.runtime.engines.openvino_engine:OpenVINOEngine",
}
# The reference pair: every other (engine, precision) is measured against its vectors at registration.
REFERENCE = ("torch", "fp32")


def engine_class(name: str):
    """The engine class registered under `name` (a key of ENGINES).

    Raises:
        KeyError: No such engine.
    """
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def engine_classes() -> list:
    """Every engine class, in ENGINES order."""
    return [engine_class(name) for name in ENGINES]


class Engine:
    """The interface every engine implements (class attributes and classmethods describe it; an instance runs).

    Attributes:
        name: Its key in ENGINES (also RuntimeConfig.engine and Runtime.engine).
        devices: Device kinds it runs on ("cpu", "cuda").
        runs: {device kind: precisions it runs there when asked for by name}.
        speed: {device kind: {precision: rank}}: the pairs "default" may take, ranked by how fast each
            ran on ViT-B/32 shapes against the other engines' pairs (docs/BENCHMARKS.md, "Engines");
            higher is faster. "default" takes the fastest pair that held its bar: by the rates measured
            at registration where the model loads on the machine that measured them (registry.speed),
            by these ranks elsewhere.
        absent: Why an engine asked for by name may be missing, for the error that names it.
        required_precision: A precision whose measurement must succeed (registration fails otherwise),
            or None.
        unmeasured_default: {device kind: precision} the default takes when that precision was never
            measured (a model registered on a CPU and loaded on CUDA).
        torch_free: Runs without torch; a model logged for it ships no torch weights or requirement.
        batch_wait_ms: How long concurrent calls wait to share a forward by default (runtime.batching).
        exporter: Module in clip_pyfunc.artifacts that writes its files into tower artifacts, or None.
        files: The file names it reads in a tower artifact: registration ships them only where the tower
            runs on this engine by default, unless every engine's files are asked for
            (registry.engine_files; registry.build.ship_engine_files).
    """

    name: str = ""
    devices: tuple[str, ...] = ("cpu",)
    runs: dict[str, tuple[str, ...]] = {}
    speed: dict[str, dict[str, int]] = {}
    required_precision: str | None = None
    unmeasured_default: dict[str, str] = {}
    torch_free: bool = False
    batch_wait_ms: float = 0.0
    exporter: str | None = None
    absent: str = ""
    files: tuple[str, ...] = ()

    @classmethod
    def unusable(cls, artifact_dir: str, tower: str) -> str | None:
        """Why this tower artifact cannot run on this engine here (a missing package or file), or None."""
        raise NotImplementedError

    @classmethod
    def refusal(cls, precision: str, measured: dict[str, float]) -> str | None:
        """Why this engine refuses `precision` on this hardware and artifact, or None.

        Args:
            precision: The resolved precision.
            measured: This engine's {precision: lowest cosine to the reference} from registration.
        """
        return None

    @classmethod
    def offers(cls, precision: str, measured: dict[str, float], bar: float) -> bool:
        """Whether an explicit `precision` with engine "auto" may run here: it held `bar` at registration
        (the reference engine runs any precision it has: it is the fallback)."""
        return cls.name == REFERENCE[0] or measured.get(precision, 0.0) >= bar

    @classmethod
    def make_runtime(cls, config, precision: str, cuda: bool):
        """The Runtime for this engine at `precision` (runtime.Runtime)."""
        raise NotImplementedError

    @classmethod
    def load(cls, artifact_dir: str, tower: str, runtime, loaded=None):
        """Load a tower artifact into this engine, ready to run batches.

        `loaded` is an instance of this class already holding the tower at another precision:
        registration measures every precision on one load, so an engine that can reuse it does.

        Raises:
            ModelLoadError: The engine's files are missing or do not load.
        """
        raise NotImplementedError

    def text_features(self, input_ids, attention_mask=None):
        """Token ids int64 (n, L) and, where the family takes one, their mask (n, L) -> vectors (n, dim)."""
        raise NotImplementedError

    def image_features(self, pixels):
        """Pixels float32 (n, 3, H, W) -> vectors (n, dim)."""
        raise NotImplementedError

    def patch_features(self, patches, mask, shapes):
        """NaFlex: patch sequences float32 (n, P, D), their mask (n, P) and grid shapes (n, 2) -> vectors (n, dim)."""
        raise NotImplementedError

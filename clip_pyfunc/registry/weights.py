"""The OpenVINO IR's weight storage, chosen at registration by measurement: fp32, fp16 or int8.

Weights only: int8 is NNCF's weight compression (`nncf.compress_weights`, INT8_ASYM, one scale and
zero point per output channel), fp16 is OpenVINO's own `compress_to_fp16`; the plugin dequantizes
inside the matmuls, and activations keep the precision the runtime picks (fp32 or bf16), so no
calibration data is needed. Each candidate is measured like every other pair (registry.precision):
the lowest cosine to torch fp32 on the same sample texts and images, for every precision OpenVINO
runs on this machine, and its throughput against the fp32 IR at the precision the default takes
here (batches of the samples, interleaved rounds, median). `auto` keeps the smallest storage that
held DEFAULT_PRECISION_COSINE wherever the fp32 IR held it and ran at SPEED_FLOOR or more of its
rate; a storage asked for by name is kept as measured. Each tower is judged on its own.

Measured on ViT-B/32 (docs/BENCHMARKS.md, issue 39): fp16 storage ran as fast as fp32 with half the
file; int8 ran 0.73x in bf16 on an AMX CPU (and 1.7x in fp32, where the plugin quantizes activations
on the fly), so which one wins depends on the CPU, and is measured on the registering one.
"""

from __future__ import annotations

import dataclasses
import os
import statistics

from clip_pyfunc.artifacts.towers import CheckpointInfo
from clip_pyfunc.registry.precision import lowest_cosine, sample_inputs
from clip_pyfunc.registry.speed import rate, record_forwards
from clip_pyfunc.runtime import DEFAULT_PRECISION_COSINE
from clip_pyfunc.runtime.engines.openvino_engine import OpenVINOEngine, compile_tower, ir_path

ENGINE = OpenVINOEngine.name
STORAGE = ("int8", "fp16", "fp32")  # smallest first; fp32 is what artifacts.openvino exports
SPEED_FLOOR = 0.95  # a smaller storage may cost at most 5% of the fp32 IR's throughput (issue 39)
ROUNDS = 3  # interleaved timing rounds per side; the median is kept
NOTE = f"{ENGINE} weights"  # its key in measurement_notes


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageMeasure:
    """One candidate storage on one tower.

    Attributes:
        storage: "int8" or "fp16".
        cosine: {precision: lowest cosine to torch fp32 on the sample inputs}.
        speed: Its forwards per second over the fp32 IR's, at `at` precision (median of ROUNDS).
        at: The precision the speed was taken at (the one the default takes on this machine).
    """

    storage: str
    cosine: dict[str, float]
    speed: float
    at: str

    def held(self, reference: dict[str, float]) -> str | None:
        """None where it kept every precision the fp32 IR held the gate on, at SPEED_FLOOR or faster; else why not."""
        lost = [p for p, c in self.cosine.items()
                if reference.get(p, 0.0) >= DEFAULT_PRECISION_COSINE and c < DEFAULT_PRECISION_COSINE]
        if lost:
            return f"cosine {min(self.cosine[p] for p in lost)} < {DEFAULT_PRECISION_COSINE} on {', '.join(lost)}"
        if self.speed < SPEED_FLOOR:
            return f"{self.speed:.2f}x the fp32 IR's throughput in {self.at} (< {SPEED_FLOOR})"
        return None

    def describe(self) -> str:
        cos = ", ".join(f"{p} {c}" for p, c in self.cosine.items())
        return f"{self.storage}: cosine {cos}; {self.speed:.2f}x speed in {self.at}"


def candidate_path(artifact_dir: str, storage: str) -> str:
    """Where a candidate IR is written beside the fp32 one while it is measured."""
    return os.path.join(artifact_dir, f"openvino_model.{storage}.xml")


def write_candidate(artifact_dir: str, storage: str) -> str:
    """Write the tower's fp32 IR again with `storage` weights; returns its .xml path."""
    import openvino as ov

    model = ov.Core().read_model(ir_path(artifact_dir))
    if storage == "int8":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    path = candidate_path(artifact_dir, storage)
    ov.save_model(model, path, compress_to_fp16=storage == "fp16")
    return path


def _remove_ir(xml: str) -> None:
    for path in (xml, xml.removesuffix(".xml") + ".bin"):
        if os.path.exists(path):
            os.remove(path)


def ir_precisions() -> list[str]:
    """The precisions OpenVINO compiles an IR at on this machine (int8 is a separate IR)."""
    return [p for p in OpenVINOEngine.runs["cpu"] if p != "int8" and OpenVINOEngine.refusal(p, {}) is None]


def default_precision(fidelity: dict[str, float], speeds: dict[str, dict[str, float]] | None = None) -> str:
    """The precision OpenVINO's default takes on this machine (runtime.pick_engine, with engine "openvino") for a
    tower whose fp32 IR held `fidelity` ({precision: cosine}) and ran at `speeds` here (CheckpointInfo.speeds_here),
    leaving out the separate int8 IR that storage candidates do not replace."""
    from clip_pyfunc.runtime import pick_engine
    from clip_pyfunc.settings import RuntimeConfig

    held = {p: c for p, c in fidelity.items() if p != "int8" and isinstance(c, float)}
    return pick_engine(RuntimeConfig(engine=ENGINE), {ENGINE: held}, frozenset({ENGINE}), speeds)[1]


def fp32_forwards(model, artifact_dir: str, rows: list, at: str) -> tuple[OpenVINOEngine, list]:
    """The tower's fp32 IR compiled at precision `at`, and the forwards (one batch of up to 32 rows) the model
    makes of `rows`, recorded on it: what every candidate storage of this tower is timed against."""
    runtime = OpenVINOEngine.make_runtime(model.config, at, False)
    baseline = OpenVINOEngine.load(artifact_dir, model.tower, runtime)
    return baseline, record_forwards(model, rows, baseline)


def measure_storage(model, artifact_dir: str, storage: str, reference, rows: list, at: str, baseline,
                    calls: list) -> StorageMeasure:
    """Write and measure one candidate storage of one tower.

    Args:
        model: The tower's pyfunc model (on the reference engine; left there).
        artifact_dir: Its artifact, holding the fp32 IR.
        storage: "int8" or "fp16".
        reference: Its reference vectors on `rows`.
        rows: The sample inputs.
        at: The precision to time at.
        baseline, calls: The fp32 IR at `at` and the forwards to time (fp32_forwards).
    """
    original = model.engine.engine
    cosine, speed = {}, 1.0
    try:
        path = write_candidate(artifact_dir, storage)
        for precision in ir_precisions():
            runtime = OpenVINOEngine.make_runtime(model.config, precision, False)
            engine = OpenVINOEngine(compile_tower(artifact_dir, precision, runtime.threads, ir=path), runtime)
            model.use_engine(engine)
            cosine[precision] = lowest_cosine(reference, model.embed_rows(rows)[0])
            if precision == at:
                rate(engine, calls), rate(baseline, calls)  # warm both at these shapes
                ratios = [rate(engine, calls) / rate(baseline, calls) for _ in range(ROUNDS)]
                speed = round(statistics.median(ratios), 3)
    finally:
        model.use_engine(original)
    return StorageMeasure(storage=storage, cosine=cosine, speed=speed, at=at)


def choose_ir_weights(info: CheckpointInfo, towers: dict[str, str], models: dict, asked: str = "auto") -> CheckpointInfo:
    """Measure the candidate storages of every tower's IR and write the chosen one in its place.

    Args:
        info: The description, with OpenVINO's fp32-IR fidelity measured (registry.precision).
        towers: {tower: artifact dir}.
        models: The reference models (registry.precision.reference_models).
        asked: "auto" (the smallest that held, see the module docstring), or "fp32", "fp16", "int8".

    Returns:
        The description with `ir_weights` {tower: storage}, OpenVINO's fidelity measured on the kept IRs
        (the lowest over towers), and what each candidate measured in `measurement_notes[NOTE]`. A candidate
        whose writing or measurement raised is named there and not kept (its files are removed).
    """
    with_ir = [t for t in towers if t not in info.unavailable.get(ENGINE, {}) and os.path.exists(ir_path(towers[t]))]
    if not with_ir or asked == "fp32":
        return dataclasses.replace(info, ir_weights=dict.fromkeys(with_ir, "fp32"))
    texts, images = sample_inputs()
    inputs = {"text": texts, "image": images}
    held_fp32 = dict(info.fidelity.get(ENGINE, {}))
    kept, cosines, lines = {}, {}, []
    for tower in with_ir:
        model = models[tower]
        reference = model.embed_rows(inputs[tower])[0]
        at = default_precision(held_fp32, info.speeds_here(tower))
        kept[tower], cosines[tower] = "fp32", {p: held_fp32[p] for p in ir_precisions() if p in held_fp32}
        verdicts = []
        baseline, calls = fp32_forwards(model, towers[tower], inputs[tower], at)  # once for every candidate
        for storage in (asked,) if asked != "auto" else STORAGE[:-1]:
            try:
                measure = measure_storage(model, towers[tower], storage, reference, inputs[tower], at, baseline, calls)
            except Exception as e:  # noqa: BLE001 - a storage the compressor or plugin refuses: named, fp32 stays
                verdicts.append(f"{storage}: not measured, so not kept: {type(e).__name__}: {e}"[:300])
                continue
            why = None if asked != "auto" else measure.held(held_fp32)
            verdicts.append(measure.describe() + (f" (not kept: {why})" if why else ""))
            if why is None and kept[tower] == "fp32":
                kept[tower], cosines[tower] = storage, measure.cosine
        for storage in STORAGE[:-1]:
            path = candidate_path(towers[tower], storage)
            if storage == kept[tower]:
                os.replace(path.removesuffix(".xml") + ".bin", ir_path(towers[tower]).removesuffix(".xml") + ".bin")
                os.replace(path, ir_path(towers[tower]))
            else:
                _remove_ir(path)
        lines.append(f"{tower}: kept {kept[tower]}; " + "; ".join(verdicts))
    fidelity = dict(held_fp32)
    for precision in ir_precisions():
        got = [cosines[t][precision] for t in with_ir if precision in cosines[t]]
        if got:
            fidelity[precision] = min(got)
    return dataclasses.replace(info, ir_weights=kept, fidelity={**info.fidelity, ENGINE: fidelity},
                               measurement_notes={**info.measurement_notes, NOTE: " | ".join(lines)})

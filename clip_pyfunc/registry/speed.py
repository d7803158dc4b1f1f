"""Throughput at registration: which engine and precision runs each tower fastest on the registering machine.

After fidelity (registry.precision), registration times every (engine, precision) pair that "default"
may take on this CPU (`candidates`, runtime.default_candidates: each engine's ranked pairs that run
natively here, are not refused and held DEFAULT_PRECISION_COSINE, and the reference pair) on each tower:
the forwards the tower's model makes of the sample inputs repeated to one batch of BATCH rows are
recorded once on the reference engine and replayed on every pair, in ROUNDS interleaved rounds after
one warm-up each; the median rows/s is kept. The rates and the machine they were measured on (runtime.hardware_id) go into
`CheckpointInfo.speed`; where a model loads on that machine, "default" takes the fastest pair that held
the gate where it ran runtime.MEASURED_MARGIN times the fixed order's choice or faster
(runtime.pick_engine, `speeds`), and registration ships that engine's files
(registry.build.shipped_engines). Elsewhere the engines' fixed ranks (Engine.speed) decide.

What is timed is the engine's forward alone, with every CPU this process may use as threads (a model loaded
with `num_threads` runs fewer); the stages around it (decode, resize) are the same for every pair but the
resize's library. OpenVINO is timed on its fp32 IR; the storage chosen afterwards
(registry.weights) runs at 0.95 or more of that IR's rate. Every candidate of a tower is compiled at once
while it is timed (interleaved rounds need them side by side): registration's peak memory holds each
pair's copy of that tower's weights. Measured on ViT-B/32 (docs/BENCHMARKS.md, issue 39).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from clip_pyfunc.artifacts.towers import CheckpointInfo

BATCH = 32  # rows per timed batch: the models' default batch size
ROUNDS = 3  # interleaved rounds; the median is kept
NOTE = "speed"  # its key in measurement_notes


class Recorder:
    """Passes an engine's calls through and keeps their arrays, to replay the same forwards on another engine."""

    def __init__(self, inner):
        self.inner, self.runtime, self.calls = inner, inner.runtime, []
        self.torch_free = getattr(inner, "torch_free", True)

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if not name.endswith("_features"):
            return method

        def record(*args):
            self.calls.append((name, args))
            return method(*args)
        return record


def record_forwards(model, rows: list, engine) -> list:
    """The forwards (method name, arrays) that `model` makes of `rows` repeated to BATCH rows, run on `engine`;
    the model is left on the engine it had."""
    recorder, original = Recorder(engine), model.engine.engine
    model.use_engine(recorder)
    try:
        model.embed_rows((rows * (1 + BATCH // max(1, len(rows))))[:BATCH])
    finally:
        model.use_engine(original)
    return recorder.calls


def rate(engine, calls: list) -> float:
    """Rows per second of `engine` replaying `calls` (record_forwards)."""
    rows = sum(len(args[0]) for _, args in calls)
    started = time.perf_counter()
    for name, args in calls:
        getattr(engine, name)(*args)
    return rows / (time.perf_counter() - started)


def candidates(info: CheckpointInfo, towers: dict[str, str], tower: str) -> list[tuple]:
    """The (engine class, precision) pairs "default" may take for `tower` on this CPU (runtime.default_candidates
    over the engines whose files this tower has here)."""
    from clip_pyfunc.runtime import default_candidates
    from clip_pyfunc.runtime.engines import engine_classes

    usable = [engine for engine in engine_classes() if tower not in info.unavailable.get(engine.name, {})
              and engine.unusable(towers[tower], tower) is None]
    return default_candidates("cpu", info.fidelity, usable)


def measure_speed(info: CheckpointInfo, towers: dict[str, str], models: dict) -> CheckpointInfo:
    """Time every candidate pair on every tower (see the module docstring).

    Args:
        info: The description, fidelity measured.
        towers: {tower: artifact dir}.
        models: The reference models (registry.precision.reference_models), left on the reference engine.

    Returns:
        The description with `speed` = {"hardware": runtime.hardware_id(), "rows_per_s": {tower: {engine:
        {precision: rows/s}}}} for the towers with two or more candidates, and what each tower measured in
        `measurement_notes[NOTE]`. A pair whose load or forward raises is named there and has no rate (a pair
        without one is never taken over a pair with one). Nothing is measured on CUDA or on an unknown CPU
        (runtime.hardware_id None): the fixed ranks apply there.
    """
    from clip_pyfunc.runtime import hardware_id
    from clip_pyfunc.runtime.engines import REFERENCE, engine_class
    from clip_pyfunc.registry.precision import sample_inputs

    if hardware_id() is None or any(str(m.runtime.device).startswith("cuda") for m in models.values()):
        return info  # rates that could never be matched to a machine, or CUDA's pairs: the fixed ranks
    texts, images = sample_inputs()
    inputs = {"text": texts, "image": images}
    rates, lines = {}, []
    for tower, model in models.items():
        pairs = candidates(info, towers, tower)
        if len(pairs) < 2:
            continue
        reference = model.engine.engine
        calls = record_forwards(model, inputs[tower], reference)
        engines, failed = {}, []
        for engine, precision in pairs:
            try:
                if (engine.name, precision) == REFERENCE:
                    engines[engine.name, precision] = reference
                    continue
                config = dataclasses.replace(model.config, device="cpu", engine=engine.name, precision=precision)
                loaded = reference if engine is engine_class(REFERENCE[0]) else None
                runner = engine.load(towers[tower], tower, engine.make_runtime(config, precision, False), loaded=loaded)
                if runner.runtime.precision != precision:  # OpenVINO's int8 on a tower without an int8 IR
                    failed.append(f"{engine.name} {precision} not timed: it runs as {runner.runtime.precision} "
                                  f"on the {tower} tower")
                    continue
                rate(runner, calls)  # warm-up: first-shape compilation, page faults
                engines[engine.name, precision] = runner
            except Exception as e:  # noqa: BLE001 - a pair that cannot run here is named, never the fastest
                failed.append(f"{engine.name} {precision} not timed: {type(e).__name__}: {e}"[:200])
        rate(reference, calls)
        times = {pair: [] for pair in engines}
        for _ in range(ROUNDS):
            for pair, runner in engines.items():
                if pair in times:
                    try:
                        times[pair].append(rate(runner, calls))
                    except Exception as e:  # noqa: BLE001 - named below, and without a rate never the default
                        failed.append(f"{pair[0]} {pair[1]} not timed: {type(e).__name__}: {e}"[:200])
                        del times[pair]
        del engines
        got = {pair: round(statistics.median(r), 2) for pair, r in times.items()}
        for (engine_name, precision), value in got.items():
            rates.setdefault(tower, {}).setdefault(engine_name, {})[precision] = value
        ranked = sorted(got.items(), key=lambda item: -item[1])
        lines.append(f"{tower}: " + ", ".join(f"{e} {p} {r} rows/s" for (e, p), r in ranked) + "".join(
            f"; {why}" for why in failed))
    if not rates:
        return info
    notes = {**info.measurement_notes, NOTE: f"batches of {BATCH}, median of {ROUNDS}, on {hardware_id()}: "
             + " | ".join(lines)}
    return dataclasses.replace(info, speed={"hardware": hardware_id(), "rows_per_s": rates}, measurement_notes=notes)

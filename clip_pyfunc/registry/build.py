"""Registration's first step: build the tower artifacts once, before anything is logged.

`build_towers` reads the checkpoint once (artifacts.towers.export_towers), loads each tower once
on the reference engine, has each engine's exporter write its files from those loaded towers
(artifacts.towers.export_engine_files), measures every (engine, precision) pair on the same
loaded models (registry.precision.measure_fidelity), quantizes where `registry.int8` asks, times
the pairs that held (registry.speed), chooses the OpenVINO IR's weight storage by measurement
(registry.weights), writes the finished description into both artifacts and removes the files of
engines a tower will not run on (ship_engine_files). Logging (registry.publish) then only copies files.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from clip_pyfunc.artifacts.checkpoint import ResolvedCheckpoint, resolve_checkpoint
from clip_pyfunc.artifacts.towers import TOWERS, WEIGHTS_FILE, CheckpointInfo, export_engine_files, export_towers
from clip_pyfunc.settings import Settings

_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class BuiltTowers:
    """What registration logs: the checkpoint, its finished description, the tower artifacts and their space.

    Attributes:
        checkpoint: Where the weights came from.
        info: The description both artifacts carry (fidelity and notes filled in).
        towers: {"text": dir, "image": dir}.
        space: The embedding space (weights_space).
        shipped: {tower: the engines whose files its artifact carries} (ship_engine_files).
    """

    checkpoint: ResolvedCheckpoint
    info: CheckpointInfo
    towers: dict[str, str]
    space: str
    shipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def build_towers(settings: Settings, workdir: str) -> BuiltTowers:
    """Export, measure and describe the towers of `settings.model` in `workdir` (see the module docstring).

    `registry.engines` false skips the other engines' files and the fidelity measurement: the models
    then run on the reference engine only (the test suite registers so, outside the engine tests).

    Raises:
        ModelLoadError: The checkpoint cannot be found or read, or is not a supported family.
    """
    from clip_pyfunc.registry.precision import measure_fidelity, reference_models
    from clip_pyfunc.registry.speed import measure_speed

    from clip_pyfunc.errors import ConfigError
    from clip_pyfunc.runtime.engines import ENGINES, engine_class

    engine = settings.runtime.engine
    if not settings.registry.engines and engine in ENGINES and engine_class(engine).torch_free:
        raise ConfigError(f"runtime.engine {engine!r} runs the files registration exports, and registry.engines is "
                          "false (--no-engines); register with engines, or with engine 'auto' or the reference")
    if not settings.registry.engines and settings.registry.int8:
        raise ConfigError("registry.int8 (--int8) quantizes the OpenVINO IR that registry.engines false "
                          "(--no-engines) does not export; drop one of the two")
    model = settings.model
    checkpoint = resolve_checkpoint(model.source, model.revision, model.cache_dir)
    info, towers = export_towers(checkpoint, workdir)
    space = weights_space(towers, info.embedding_dim)
    if settings.registry.engines:
        from clip_pyfunc.registry.weights import choose_ir_weights

        models = reference_models(towers)  # each tower loaded once, for every engine's files and measurement
        info = export_engine_files(info, towers, {tower: m.engine.engine for tower, m in models.items()})
        info = measure_fidelity(info, towers, models)
        if settings.registry.int8:  # calibrated on the fp32 IR, before its storage is chosen
            from clip_pyfunc.registry.quantize import quantize_image_tower

            info = quantize_image_tower(info, towers, settings.registry.calibration_data)
        if settings.registry.engine_order == "measured":  # which pair that held runs each tower fastest here
            info = measure_speed(info, towers, models)
        plan, info = shipped_engines(settings, info, towers)
        ir_towers = {t: path for t, path in towers.items() if any(engine_class(e).exporter for e in plan[t])}
        info = choose_ir_weights(info, ir_towers, models, settings.registry.ir_weights)
        del models
    else:  # said in the summary, the tags and at load (a model asked to run there falls back with a note)
        why = "not exported: registered with registry.engines false (--no-engines)"
        info = dataclasses.replace(info, unavailable={e: dict.fromkeys(towers, why) for e in ENGINES
                                                      if engine_class(e).exporter})
        plan, info = shipped_engines(settings, info, towers)
    for path in towers.values():
        info.write(path)
    ship_engine_files(towers, plan)  # as planned before the storage choice, whatever it measured
    return BuiltTowers(checkpoint=checkpoint, info=info, towers=towers, space=space, shipped=plan)


def weights_space(towers: dict[str, str], embedding_dim: int) -> str:
    """The embedding space of exported towers: a sha256 of both towers' fp32 weights files, and the dimension.

    The export is deterministic, so two registrations of one checkpoint give one space and another
    checkpoint another. Call it before `ship_engine_files`, which may remove the weights files.

    Returns:
        "sha256:<32 hex digits>/<dim>".
    """
    import hashlib

    digest = hashlib.sha256()
    for tower in TOWERS:
        path = os.path.join(towers[tower], WEIGHTS_FILE)
        digest.update(f"{tower} {os.path.getsize(path)}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:32]}/{embedding_dim}"


def shipped_engines(settings: Settings, info: CheckpointInfo, towers: dict[str, str]):
    """Which engines' files each tower artifact will ship.

    With `registry.engine_files` "chosen" (the default), a tower keeps the files of the engine it runs on by
    default on this machine (models.base.plan_engine under `settings.runtime`: the engine of the fastest pair
    that held the gate, by the rates measured here where registry.speed timed them, torch on CUDA), so its
    artifact holds one copy of its weights. Where this machine cannot resolve the runtime settings
    (`device: cuda` registered on a CPU, say), nothing is chosen: every engine's files stay, and
    `measurement_notes["engine files"]` says why. "all" keeps every engine's files, except torch weights
    where the model is logged for a torch-free engine by name (`engine: openvino`): its torch-free
    environment could not load them.

    Returns:
        ({tower: the engines whose files it ships}, the description with that note where there is one).
    """
    from clip_pyfunc.errors import ModelLoadError
    from clip_pyfunc.models.base import plan_engine
    from clip_pyfunc.runtime.engines import engine_classes

    asked = settings.runtime.engine
    torch_free = [e.name for e in engine_classes() if e.torch_free]
    plan = {}
    for tower, path in towers.items():
        keep = [e.name for e in engine_classes() if e.unusable(path, tower) is None]
        if settings.registry.engine_files == "chosen":
            try:
                keep = [plan_engine(path, tower, settings.runtime, info)]
            except ModelLoadError as e:
                note = f"every engine's files kept: the runtime settings do not resolve here ({e})"[:500]
                info = dataclasses.replace(info, measurement_notes={**info.measurement_notes, "engine files": note})
        elif asked in torch_free and asked in keep:
            keep = [e for e in keep if e in torch_free]
        plan[tower] = keep
    return plan, info


def ship_engine_files(towers: dict[str, str], plan: dict[str, list[str]]) -> None:
    """Remove from each tower artifact, once measured, the files of the engines `plan` (shipped_engines) leaves out."""
    from clip_pyfunc.runtime.engines import engine_classes

    for tower, path in towers.items():
        for engine in engine_classes():
            if engine.name not in plan[tower]:
                for name in engine.files:
                    if os.path.exists(os.path.join(path, name)):
                        os.remove(os.path.join(path, name))


def describe_engines(info: CheckpointInfo) -> dict:
    """The registration summary's engines: per engine, each measured precision's lowest cosine to the reference
    (the reference itself 1.0), and for an engine with files of its own the towers it could not take, with why
    ("fallback": they run on torch); under "notes", per "engine precision", why a pair raised when measured, or
    what int8 was judged on."""
    from clip_pyfunc.runtime.engines import REFERENCE, engine_classes

    out = {}
    for engine in engine_classes():
        row = dict(info.fidelity.get(engine.name, {}))
        if engine.name == REFERENCE[0]:
            row = {REFERENCE[1]: 1.0, **row}
        if engine.exporter:
            row["fallback"] = dict(info.unavailable.get(engine.name, {}))
        out[engine.name] = row
    out["ir_weights"] = dict(info.ir_weights)
    out["speed"] = dict(info.speed)
    out["notes"] = dict(info.measurement_notes)
    return out


def reference_fidelity(info: CheckpointInfo) -> dict[str, float]:
    """The reference engine's other precisions and their cosines (the summary's `precision_cosine_to_fp32`)."""
    from clip_pyfunc.runtime.engines import REFERENCE

    return dict(info.fidelity.get(REFERENCE[0], {}))



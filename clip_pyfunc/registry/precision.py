"""Fidelity measurement at registration: how close each engine and precision stays to the reference.

The reference is torch fp32 on the same artifact (runtime.engines.REFERENCE). Each tower is
loaded once, on the reference; every other (engine, precision) pair the registering machine
runs (each engine's `runs` on this device, less what it refuses here) then runs the same sample
texts and images (toy shapes and photo-like JPEGs) through the same loaded model, its engine
swapped (ClipEmbeddingModel.use_engine). The lowest cosine per pair goes into the description's
`fidelity` table, where the runtime's "default" reads it (runtime.pick_runtime), and into the
versions' tags. A pair whose measurement raises is named with its reason in `measurement_notes`
(summary and tags), never dropped in silence.
"""

from __future__ import annotations

import dataclasses

from clip_pyfunc.artifacts.towers import CheckpointInfo
from clip_pyfunc.registry.lookup import local_models
from clip_pyfunc.settings import RuntimeConfig

TAG_COSINE = "cosine_to_fp32_"  # + precision (the reference engine), or + engine + "_" + precision


def sample_inputs() -> tuple[list[str], list[str]]:
    """The texts and base64 images every pair is measured on (toy shapes, and photo-like JPEGs)."""
    from clip_pyfunc.dev.samples import SAMPLE_TEXTS, photo_jpeg, sample_images_b64

    texts = list(SAMPLE_TEXTS) + ["", "a photo of something else entirely, described at some length"]
    images = sample_images_b64() + [photo_jpeg(640, 480, seed=s) for s in range(2)]
    return texts, images


def lowest_cosine(reference, got) -> float:
    """The lowest row cosine between two sets of L2-normalised vectors, rounded to 6 places."""
    import numpy as np

    return round(float(np.min(np.sum(reference * got, axis=1))), 6)


def reference_models(towers: dict[str, str], device: str = "auto") -> dict:
    """Each tower loaded once on the reference pair: {tower: model} (models.text / models.image)."""
    from clip_pyfunc.runtime.engines import REFERENCE

    engine, precision = REFERENCE
    models = local_models(towers, RuntimeConfig(device=device, engine=engine, precision=precision), tuple(towers))
    return {model.tower: model for model in models}


def measure_fidelity(info: CheckpointInfo, towers: dict[str, str], models: dict) -> CheckpointInfo:
    """Measure every other (engine, precision) the registering machine runs against the reference.

    Args:
        info: The description; `unavailable` says which towers an engine has no files for.
        towers: {tower: artifact dir}.
        models: The reference models (reference_models); each is left on the reference engine.

    On a CPU: torch bf16 and int8, OpenVINO fp32, and OpenVINO bf16 where the CPU has native
    bf16; on CUDA: torch fp16 and bf16 (each engine's `runs`, less what it refuses). The lowest
    cosine over the towers and sample inputs becomes `fidelity[engine][precision]`.

    A pair whose measurement raises (int8 on SigLIP 2's patch Linear, say) has no cosine, so it is
    never the default: its reason goes into `measurement_notes` ("torch int8": "not measured ...:
    ErrorType: message"), which the summary and the version tags carry, so a default that moved
    to the next pair says why. An engine's `required_precision` (OpenVINO fp32, the IR every
    OpenVINO model runs) is not caught: registration fails on it.

    Returns:
        The description with `fidelity` and `measurement_notes` filled in (the caller writes it).
    """
    from clip_pyfunc.runtime.engines import REFERENCE, engine_class, engine_classes

    texts, images = sample_inputs()
    inputs = {"text": texts, "image": images}
    reference_engines = {tower: model.engine.engine for tower, model in models.items()}
    reference = {tower: model.embed_rows(inputs[tower])[0] for tower, model in models.items()}
    device = "cuda" if any(str(m.runtime.device).startswith("cuda") for m in models.values()) else "cpu"
    fidelity, notes = {}, dict(info.measurement_notes)
    for engine in engine_classes():
        ready = [t for t in towers if t not in info.unavailable.get(engine.name, {})
                 and engine.unusable(towers[t], t) is None]
        run_on = device if device in engine.devices else "cpu"
        for precision in engine.runs.get(run_on, ()):
            if (engine.name, precision) == REFERENCE or not ready or engine.refusal(precision, {}) is not None:
                continue
            try:
                got = {}
                for tower in ready:
                    model = models[tower]
                    config = dataclasses.replace(model.config, device=run_on, engine=engine.name, precision=precision)
                    runtime = engine.make_runtime(config, precision, run_on == "cuda")
                    loaded = reference_engines[tower] if engine is engine_class(REFERENCE[0]) else None
                    model.use_engine(engine.load(towers[tower], tower, runtime, loaded=loaded))
                    got[tower] = model.embed_rows(inputs[tower])[0]
            except Exception as e:  # noqa: BLE001 - any failure of an optional pair; named below, never silent
                if precision == engine.required_precision:
                    raise
                notes[f"{engine.name} {precision}"] = f"not measured, so never the default: {type(e).__name__}: {e}"[:500]
                continue
            finally:
                for tower, model in models.items():
                    model.use_engine(reference_engines[tower])
            fidelity.setdefault(engine.name, {})[precision] = min(lowest_cosine(reference[t], got[t]) for t in got)
    return dataclasses.replace(info, fidelity=fidelity, measurement_notes=notes)

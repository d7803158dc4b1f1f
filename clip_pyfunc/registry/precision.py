"""Fidelity measurement at registration: how close each engine and precision stays to torch fp32.

The reference is torch fp32 on the same artifact. Each other (engine, precision) pair the
registering machine runs is measured on sample texts and images (toy shapes and photo-like
JPEGs), and its lowest cosine is written into both towers' `clip_pyfunc.json`, where the
runtime's "default" reads it (runtime.pick_runtime), and into the versions' tags. A pair whose
measurement raises is named with its reason in `measurement_notes` (summary and tags), never dropped
in silence.
"""

from __future__ import annotations

import dataclasses

from clip_pyfunc.artifacts.towers import CheckpointInfo
from clip_pyfunc.registry.lookup import local_models
from clip_pyfunc.settings import RuntimeConfig

TAG_COSINE = "cosine_to_fp32_"  # + precision (torch), or + "openvino_" + precision


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


def embed_samples(towers: dict[str, str], inputs: dict[str, list], engine: str, precision: str,
                  device: str) -> dict:
    """Each tower's vectors for the sample inputs on one (engine, precision): {tower: float32 [n, dim]}.

    A tower the engine cannot take here (no IR: it falls back to torch) is left out.
    """
    models = local_models(towers, RuntimeConfig(device=device, engine=engine, precision=precision))
    return {m.tower: m.embed_rows(inputs[m.tower])[0] for m in models if m.runtime.engine == engine}


def measure_precisions(info: CheckpointInfo, towers: dict[str, str], device: str = "auto") -> CheckpointInfo:
    """Measure each other (engine, precision) the registering machine runs against torch fp32.

    torch: "bf16" and "int8" on CPU, "fp16" and "bf16" on CUDA. OpenVINO (CPU, towers that have
    IR): "fp32", and "bf16" where the CPU has native bf16. The lowest cosine over the towers and
    sample inputs is written into both towers' `clip_pyfunc.json`.

    A pair whose measurement raises (int8 on SigLIP 2's patch Linear, say) has no cosine, so it is
    never the default: its reason goes into `measurement_notes` ("torch int8": "not measured ...:
    ErrorType: message"), which the summary and the version tags carry, so a default that moved
    to the next pair says why. The reference (torch fp32) and OpenVINO fp32, the IR every OpenVINO
    model runs, are not caught: registration fails on them.

    Returns:
        The description with `precision_cosine`, `openvino_cosine` and `measurement_notes` filled in.
    """
    import torch

    from clip_pyfunc.runtime import cpu_has_native_bf16

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    texts, images = sample_inputs()
    inputs = {"text": texts, "image": images}
    pairs = [("torch", p, device) for p in (("fp16", "bf16") if cuda else ("bf16", "int8"))]
    if any(tower not in info.openvino_fallback for tower in towers):
        pairs += [("openvino", p, "cpu") for p in (("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",))]
    reference = embed_samples(towers, inputs, "torch", "fp32", device)
    measured, notes = {"torch": {}, "openvino": {}}, {}
    for engine, precision, on in pairs:
        try:
            got = embed_samples(towers, inputs, engine, precision, on)
        except Exception as e:  # noqa: BLE001 - any failure of an optional pair; named below, never silent
            if (engine, precision) == ("openvino", "fp32"):
                raise
            notes[f"{engine} {precision}"] = f"not measured, so never the default: {type(e).__name__}: {e}"[:500]
            continue
        if got:
            measured[engine][precision] = min(lowest_cosine(reference[t], got[t]) for t in got)
    info = dataclasses.replace(info, precision_cosine=measured["torch"], openvino_cosine=measured["openvino"],
                               measurement_notes=notes)
    for path in towers.values():
        info.write(path)
    return info

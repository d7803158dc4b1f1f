"""Fidelity measurement at registration: how close each engine and precision stays to torch fp32.

The reference is torch fp32 on the same artifact. Each other (engine, precision) pair the
registering machine runs is measured on sample texts and images (toy shapes and photo-like
JPEGs), and its lowest cosine is written into both towers' `clip_pyfunc.json`, where the
runtime's "default" reads it (runtime.pick_runtime), and into the versions' tags.
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


def measure_precisions(info: CheckpointInfo, towers: dict[str, str], device: str = "auto") -> CheckpointInfo:
    """Measure each other (engine, precision) the registering machine runs against torch fp32.

    torch: "bf16" and "int8" on CPU, "fp16" and "bf16" on CUDA. OpenVINO (CPU, towers that have
    IR): "fp32", and "bf16" where the CPU has native bf16. A pair that cannot run is not
    measured, so it is never the default. The lowest cosine over the towers and sample inputs
    is written into both towers' `clip_pyfunc.json`.

    Returns:
        The description with `precision_cosine` and `openvino_cosine` filled in.
    """
    import torch

    from clip_pyfunc.runtime import cpu_has_native_bf16

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    texts, images = sample_inputs()
    inputs = {"text": texts, "image": images}

    def vectors(engine, precision, on=device):
        models = local_models(towers, RuntimeConfig(device=on, engine=engine, precision=precision))
        return {m.tower: m.embed_rows(inputs[m.tower])[0] for m in models if m.runtime.engine == engine}

    reference = vectors("torch", "fp32")
    found = {}
    for precision in (("fp16", "bf16") if cuda else ("bf16", "int8")):
        try:
            got = vectors("torch", precision)
        except Exception:  # noqa: BLE001 - a precision this family cannot run (int8 on SigLIP 2's patch Linear)
            continue  # not measured, so never the default
        found[precision] = min(lowest_cosine(reference[t], got[t]) for t in got)
    openvino = {}
    if any(tower not in info.openvino_fallback for tower in towers):
        for precision in ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",):
            got = vectors("openvino", precision, on="cpu")
            if got:
                openvino[precision] = min(lowest_cosine(reference[t], got[t]) for t in got)
    info = dataclasses.replace(info, precision_cosine=found, openvino_cosine=openvino)
    for path in towers.values():
        info.write(path)
    return info

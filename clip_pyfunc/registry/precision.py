"""Precision measurement at registration: how close each faster precision stays to fp32 on sample inputs."""

from __future__ import annotations

from clip_pyfunc.artifacts.towers import CheckpointInfo
from clip_pyfunc.registry.lookup import local_models
from clip_pyfunc.settings import RuntimeConfig

TAG_COSINE = "cosine_to_fp32_"


def measure_precisions(info: CheckpointInfo, towers: dict[str, str], device: str = "auto") -> CheckpointInfo:
    """Measure each other precision the registering machine runs against fp32; record it in the artifacts.

    The lowest cosine over sample texts and images (toy shapes and photo-like JPEGs) per precision
    ("bf16" and "int8" on CPU, "fp16" and "bf16" on CUDA) is written into both towers'
    `clip_pyfunc.json`, where the runtime's "default" precision reads it.

    Returns:
        The description with `precision_cosine` filled in.
    """
    import dataclasses

    import numpy as np
    import torch

    from clip_pyfunc.dev.samples import SAMPLE_TEXTS, photo_jpeg, sample_images_b64

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    texts = list(SAMPLE_TEXTS) + ["", "a photo of something else entirely, described at some length"]
    images = sample_images_b64() + [photo_jpeg(640, 480, seed=s) for s in range(2)]

    def vectors(precision):
        text, image = local_models(towers, RuntimeConfig(device=device, precision=precision))
        return text.embed_rows(texts)[0], image.embed_rows(images)[0]

    reference = vectors("fp32")
    found = {}
    for precision in (("fp16", "bf16") if cuda else ("bf16", "int8")):
        try:
            got = vectors(precision)
        except Exception:  # noqa: BLE001 - a precision this family cannot run (int8 on SigLIP 2's patch Linear)
            continue  # not measured, so never the default
        found[precision] = round(float(min(np.min(np.sum(a * b, axis=1)) for a, b in zip(reference, got))), 6)
    info = dataclasses.replace(info, precision_cosine=found)
    for path in towers.values():
        info.write(path)
    return info

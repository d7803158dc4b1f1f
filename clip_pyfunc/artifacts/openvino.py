"""OpenVINO IR in a tower artifact: exported at registration, compiled at load time.

Each tower artifact may hold `openvino_model.xml` / `.bin` (the tower's fp32 forward, from the
family's own `get_text_features` / `get_image_features` through `openvino.convert_model`) and,
for the image tower after `register --int8`, `openvino_model_int8.xml` / `.bin` (NNCF's static
post-training quantization). Shapes stay dynamic in the batch, and in the sequence length
where the family pads text to the batch. No pickle: IR is XML plus raw weights.
"""

from __future__ import annotations

import os
import warnings

from clip_pyfunc.errors import ModelLoadError

IR_FILE = "openvino_model.xml"
IR_INT8_FILE = "openvino_model_int8.xml"


def ir_path(artifact_dir: str, precision: str = "fp32") -> str:
    """Where a tower artifact keeps its IR ("int8": the quantized image tower)."""
    return os.path.join(artifact_dir, IR_INT8_FILE if precision == "int8" else IR_FILE)


def openvino_available() -> bool:
    """True where the openvino package imports."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def export_ir(artifact_dir: str, tower: str, info) -> str | None:
    """Convert a tower artifact's torch forward to OpenVINO IR beside its weights.

    Args:
        artifact_dir: A tower artifact (artifacts.towers.export_towers).
        tower: "text" or "image".
        info: Its CheckpointInfo (text padding and image inputs decide the IR's inputs).

    Returns:
        None when the IR was written, else why OpenVINO could not take this tower (one line);
        that tower then runs on torch. Not an error: ALIGN's EfficientNet, for one, does not convert.
    """
    import numpy as np
    import openvino as ov
    import torch

    from clip_pyfunc.artifacts.towers import load_tower
    from clip_pyfunc.runtime import features

    module = load_tower(artifact_dir, tower)
    wrapper, example, shapes = _wrap(module, tower, info, artifact_dir)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # tracing warns about every shape check in the family's code; the converted IR is
            # compared with torch's own vectors below, which is the check that counts
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = ov.convert_model(wrapper, example_input=tuple(example.values()), input=shapes)
            want = features(_call(module, tower, info, example)).float().numpy()
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled({k: v.numpy() for k, v in example.items()})[0]
    except Exception as e:  # noqa: BLE001 - any conversion failure means "this tower stays on torch"
        return f"{type(e).__name__}: {_first_line(e)}"
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-4, rtol=1e-3):
        return f"the converted {tower} tower's vectors differ from torch's (max {np.abs(got - want).max():.2e})"
    ov.save_model(model, ir_path(artifact_dir), compress_to_fp16=False)
    return None


def _call(module, tower: str, info, inputs: dict):
    """The tower's own features call on torch inputs."""
    if tower == "text":
        return module.get_text_features(**inputs)
    return module.get_image_features(**inputs)


def _wrap(module, tower: str, info, artifact_dir: str):
    """A torch module whose forward is the tower's features call, its example inputs and their OpenVINO shapes."""
    import openvino as ov
    import torch

    from clip_pyfunc.runtime import features

    class Text(torch.nn.Module):
        def forward(self, input_ids):
            return features(module.get_text_features(input_ids=input_ids))

    class MaskedText(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return features(module.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    class Image(torch.nn.Module):
        def forward(self, pixel_values):
            return features(module.get_image_features(pixel_values=pixel_values))

    class Patches(torch.nn.Module):
        def forward(self, pixel_values, pixel_attention_mask, spatial_shapes):
            return features(module.get_image_features(pixel_values=pixel_values,
                                                      pixel_attention_mask=pixel_attention_mask,
                                                      spatial_shapes=spatial_shapes))

    if tower == "text":
        length = info.pad_to or 7
        example = {"input_ids": torch.ones((2, length), dtype=torch.int64)}
        shapes = [ov.PartialShape([-1, info.pad_to or -1])]
        if info.attention_mask:
            example["attention_mask"] = torch.ones((2, length), dtype=torch.int64)
            shapes.append(ov.PartialShape([-1, info.pad_to or -1]))
    elif info.image_inputs == "naflex":
        from clip_pyfunc.stages.preprocess import read_image_spec

        spec = read_image_spec(artifact_dir)
        patches, dim = spec.max_num_patches, spec.patch_size ** 2 * 3
        side = int(patches ** 0.5)
        example = {"pixel_values": torch.randn((2, patches, dim)),
                   "pixel_attention_mask": torch.ones((2, patches), dtype=torch.int32),
                   "spatial_shapes": torch.tensor([[side, side]] * 2, dtype=torch.int64)}
        shapes = [ov.PartialShape([-1, patches, dim]), ov.PartialShape([-1, patches]), ov.PartialShape([-1, 2])]
    else:
        from clip_pyfunc.stages.preprocess import read_image_spec

        height, width = read_image_spec(artifact_dir).output_hw
        example = {"pixel_values": torch.randn((2, 3, height, width))}
        shapes = [ov.PartialShape([-1, 3, height, width])]
    wrapper = (MaskedText if "attention_mask" in example else Text) if tower == "text" else (
        Patches if "spatial_shapes" in example else Image)
    return wrapper().eval(), example, shapes


def compile_tower(artifact_dir: str, precision: str, threads: int):
    """Compile a tower artifact's IR for the CPU.

    Args:
        artifact_dir: The tower artifact.
        precision: "fp32" (f32 inference, also on CPUs where OpenVINO would pick bf16 by itself),
            "bf16" (bf16 inference precision) or "int8" (the int8 IR where the artifact has one,
            the fp32 IR otherwise: only the image tower is quantized).
        threads: OpenVINO's inference threads.

    Returns:
        An openvino.CompiledModel, with the LATENCY hint: one stream that gives each forward every
        thread, as torch does; concurrent requests each run on their own infer request.

    Raises:
        ModelLoadError: The IR is missing or cannot be read or compiled.
    """
    import openvino as ov

    path = ir_path(artifact_dir, precision)
    if precision == "int8" and not os.path.exists(path):
        path = ir_path(artifact_dir)
    if not os.path.exists(path):
        raise ModelLoadError(f"no OpenVINO IR in {artifact_dir} ({os.path.basename(path)})")
    # The precision hint is always explicit: left out, OpenVINO's CPU plugin reads the hardware
    # itself and runs bf16 on AVX512_BF16/AMX CPUs, so an "fp32" tower would silently be bf16 there.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads),
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    try:
        return ov.Core().compile_model(path, "CPU", config)
    except Exception as e:  # noqa: BLE001 - openvino raises RuntimeError subclasses with no common base
        raise ModelLoadError(f"cannot compile the OpenVINO IR {path}: {_first_line(e)}") from e


def _first_line(error: Exception) -> str:
    """An exception's first non-empty line, shortened (OpenVINO's messages run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def export_openvino(info, towers: dict[str, str]):
    """Export every tower's IR (export_ir); record why any tower has none in `openvino_fallback`.

    Args:
        info: The CheckpointInfo both towers carry.
        towers: {"text": dir, "image": dir}.

    Returns:
        The description with `openvino_fallback` filled in (written into both artifacts).
    """
    import dataclasses

    fallback = {}
    for tower, path in towers.items():
        reason = export_ir(path, tower, info) if openvino_available() else "openvino is not installed"
        if reason:
            fallback[tower] = reason
    info = dataclasses.replace(info, openvino_fallback=fallback)
    for path in towers.values():
        info.write(path)
    return info

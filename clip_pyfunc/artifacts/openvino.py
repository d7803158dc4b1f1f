"""The OpenVINO engine's exporter: a tower's IR written into its artifact at registration.

runtime.engines.openvino_engine names this module as its `exporter`, and compiles the IR at
load time; `export` is what registration calls. Each tower artifact may hold
`openvino_model.xml` / `.bin` (the tower's fp32 forward, from the family's own
`get_text_features` / `get_image_features` through `openvino.convert_model`) and,
for the image tower after `register --int8`, `openvino_model_int8.xml` / `.bin` (NNCF's static
post-training quantization). Shapes stay dynamic in the batch, and in the sequence length
where the family pads text to the batch. No pickle: IR is XML plus raw weights.
"""

from __future__ import annotations

import warnings

from clip_pyfunc.runtime.engines.openvino_engine import first_line, ir_path, openvino_available


def export_ir(artifact_dir: str, tower: str, info, module) -> str | None:
    """Convert a tower's torch forward to OpenVINO IR beside its weights.

    Args:
        artifact_dir: A tower artifact (artifacts.towers.export_towers).
        tower: "text" or "image".
        info: Its CheckpointInfo (text padding and image inputs decide the IR's inputs).
        module: The tower loaded in fp32 (runtime.engines.torch_engine.load_tower), on the CPU.

    Returns:
        None when the IR was written, else why OpenVINO could not take this tower (one line);
        that tower then runs on torch. Not an error: ALIGN's EfficientNet, for one, does not convert.
    """
    import numpy as np
    import openvino as ov
    import torch
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    from clip_pyfunc.runtime import features

    wrapper, example, shapes = _wrap(module, tower, info, artifact_dir)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # tracing warns about every shape check in the family's code, and its own check re-runs the
            # forward; the converted IR is compared with torch's own vectors below, which is the check that counts
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            decoder = TorchScriptPythonDecoder(wrapper, example_input=tuple(example.values()),
                                               trace_kwargs={"check_trace": False})
            model = ov.convert_model(decoder, example_input=tuple(example.values()), input=shapes)
            want = features(_call(module, tower, info, example)).float().numpy()
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled({k: v.numpy() for k, v in example.items()})[0]
    except Exception as e:  # noqa: BLE001 - any conversion failure means "this tower stays on torch"
        return f"{type(e).__name__}: {first_line(e)}"
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


def export(info, towers: dict[str, str], references: dict) -> dict[str, str]:
    """The OpenVINO engine's exporter: write every tower's IR (export_ir).

    Args:
        info: The CheckpointInfo both towers carry.
        towers: {"text": dir, "image": dir}.
        references: {tower: its reference engine (runtime.engines.torch_engine.TorchEngine, fp32)}: a tower
            loaded on the CPU is converted as it is, without reading its weights again.

    Returns:
        {tower: why it has no IR} for the towers that stay on torch (CheckpointInfo.unavailable["openvino"]).
    """
    if not openvino_available():
        return {tower: "openvino is not installed" for tower in towers}
    from clip_pyfunc.runtime.engines.torch_engine import load_tower

    reasons = {}
    for tower, path in towers.items():
        loaded = references[tower]
        on_cpu = str(loaded.runtime.device) == "cpu"  # a tower on CUDA is loaded again for the CPU trace
        reasons[tower] = export_ir(path, tower, info, loaded.module if on_cpu else load_tower(path, tower))
    return {tower: reason for tower, reason in reasons.items() if reason}

"""The torch engine: a family's full model class holding one tower (the reference, and the engine on CUDA)."""

from __future__ import annotations

import contextlib
import os

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.runtime.engines import Engine

WEIGHTS_FILE = "model.safetensors"  # a tower artifact's weights, under the full model's own names


class TorchEngine(Engine):
    """A family's full model class holding one tower, on the Runtime's device and precision.

    The stages hand it numpy arrays and never ask which engine it is; each call runs one forward
    (inference mode, autocast where the precision asks for it) and returns the tower's vectors as
    a float32 numpy array (n, dim), the family's own `get_text_features` / `get_image_features`.
    Its fp32 on CPU is the reference every other pair is measured against. Precisions: bf16 under
    autocast (emulated on CPUs without native bf16), fp16 weights on CUDA, and int8 by dynamic
    quantisation of the Linear layers.
    """

    name = "torch"
    devices = ("cpu", "cuda")
    runs = {"cpu": ("fp32", "bf16", "int8"), "cuda": ("fp32", "fp16", "bf16")}
    speed = {"cpu": {"bf16": 30, "fp32": 10}, "cuda": {"fp16": 30, "bf16": 20, "fp32": 10}}
    unmeasured_default = {"cuda": "fp16"}
    # A bigger batch pays here: on ViT-B/32 (2-core AVX2 EPYC, docs/SERVING.md) torch fp32 served 5.7
    # images/s at 1 row and 10.7 at 6. 40 ms merged two groups of 4 requests into one of 8 (20 ms did not).
    batch_wait_ms = 40.0
    absent = ("torch is not installed here or the model was logged without torch weights (for a torch-free engine, "
              "or with the chosen engine's files alone)")
    files = (WEIGHTS_FILE,)

    def __init__(self, module, runtime):
        """Args: module: the tower, already on the runtime's device and precision (apply_precision)."""
        self.module, self.runtime = module, runtime

    @classmethod
    def unusable(cls, artifact_dir: str, tower: str) -> str | None:
        """None where torch imports and the artifact keeps its safetensors (a torch-free model has none)."""
        from clip_pyfunc.runtime import torch_available

        if not os.path.exists(os.path.join(artifact_dir, WEIGHTS_FILE)):
            return (f"the {tower} artifact has no torch weights ({WEIGHTS_FILE}): it was registered with the files of "
                    f"the engine it runs on by default alone; register with --all-engine-files "
                    f"(registry.engine_files: all) to run it on torch too")
        if not torch_available():
            return "torch is not installed"
        return None

    @classmethod
    def make_runtime(cls, config, precision: str, cuda: bool):
        """Device, input and autocast dtypes, and torch's intra-op threads (`num_threads` sets them)."""
        import torch

        from clip_pyfunc.runtime import Runtime

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = torch.device(("cuda" if config.device == "auto" else config.device) if cuda else "cpu")
        return Runtime(engine=cls.name, device=device, precision=precision,
                       input_dtype=torch.float16 if precision == "fp16" else torch.float32,
                       autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
                       batch_size=config.batch_size, threads=torch.get_num_threads())

    @classmethod
    def load(cls, artifact_dir: str, tower: str, runtime, loaded=None):
        """The tower's full model class from the artifact's safetensors (or `loaded`'s fp32 module), moved to the
        runtime's device and precision."""
        import copy

        if loaded is None or loaded.runtime.precision != "fp32" or str(loaded.runtime.device) != str(runtime.device):
            return cls(apply_precision(load_tower(artifact_dir, tower), runtime), runtime)
        # bf16 runs the same weights under autocast and int8 quantizes a copy; fp16 would halve them in place
        module = copy.deepcopy(loaded.module) if runtime.precision == "fp16" else loaded.module
        return cls(apply_precision(module, runtime), runtime)

    def forward_context(self):
        """Inference mode, plus autocast when the precision asks for it."""
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.runtime.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.runtime.device.type, dtype=self.runtime.autocast_dtype))
        return stack

    def text_features(self, input_ids, attention_mask=None):
        """Token ids int64 (n, L) and, where the family takes one, their mask (n, L) -> vectors (n, dim)."""
        import torch

        from clip_pyfunc.runtime import features

        device = self.runtime.device
        kwargs = {"input_ids": torch.from_numpy(input_ids).to(device)}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(attention_mask).to(device)
        with self.forward_context():
            return _numpy(features(self.module.get_text_features(**kwargs)))

    def image_features(self, pixels):
        """Pixels float32 (n, 3, H, W) -> vectors (n, dim)."""
        import torch

        from clip_pyfunc.runtime import features

        batch = torch.from_numpy(pixels).to(self.runtime.device, self.runtime.input_dtype, non_blocking=True)
        with self.forward_context():
            return _numpy(features(self.module.get_image_features(pixel_values=batch)))

    def patch_features(self, patches, mask, shapes):
        """NaFlex: patch sequences float32 (n, P, D), their mask (n, P) and grid shapes (n, 2) -> vectors (n, dim)."""
        import torch

        from clip_pyfunc.runtime import features

        device = self.runtime.device
        with self.forward_context():
            out = self.module.get_image_features(
                pixel_values=torch.from_numpy(patches).to(device, self.runtime.input_dtype),
                pixel_attention_mask=torch.from_numpy(mask).to(device),
                spatial_shapes=torch.from_numpy(shapes).to(device),
            )
            return _numpy(features(out))


def _numpy(tensor):
    """A torch tensor -> float32 numpy array on the CPU."""
    return tensor.float().cpu().numpy()


def apply_precision(model, runtime):
    """Move a tower to its device and precision (fp16 weights, int8 dynamic quantisation)."""
    import torch

    if runtime.precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if runtime.precision == "fp16":
        model = model.half()
    return model.to(runtime.device)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars while we split towers on purpose."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_tower(artifact_dir: str, tower: str):
    """Build the family's full model class holding only one tower, with the artifact's weights.

    The other tower is never materialised: the class is built without weight initialisation
    (untouched memory), the other tower's submodules are dropped, and the saved weights are
    assigned strictly, so every remaining parameter comes from the artifact. Its
    get_text_features / get_image_features are then the family's own code.

    Raises:
        ModelLoadError: The config is not a supported family, or weights are missing or extra.
    """
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.initialization import no_init_weights

    from clip_pyfunc.families import family_for

    config = transformers.AutoConfig.from_pretrained(artifact_dir)
    family = family_for(config.model_type, where=artifact_dir)
    with quiet_transformers(), no_init_weights():
        model = getattr(transformers, family.model_class)(config)
    keep = family.children(tower)
    for name, _ in list(model.named_children()):
        if name not in keep:
            delattr(model, name)
    try:
        state = load_file(os.path.join(artifact_dir, WEIGHTS_FILE))
    except OSError as e:
        raise ModelLoadError(f"cannot read the {tower} weights in {artifact_dir}: {e}") from e
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"the {tower} artifact in {artifact_dir} does not match its {family.model_class}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(torch.float32).eval().requires_grad_(False)

"""Tower artifacts: split a checkpoint into one directory per tower, describe it once, load a tower back.

A tower artifact is the only file layout the package knows: the full config.json,
`model.safetensors` (that tower's weights under the full model's names), its tokenizer or
image processor, and `clip_pyfunc.json` (the CheckpointInfo).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

from clip_pyfunc.artifacts.checkpoint import ResolvedCheckpoint
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.runtime import features
from clip_pyfunc.runtime.engines.torch_engine import WEIGHTS_FILE, quiet_transformers

TOWERS = ("text", "image")
INFO_FILE = "clip_pyfunc.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What a checkpoint is, read once at registration and stored in each tower artifact.

    Attributes:
        family: The family's model_type (see clip_pyfunc.families).
        embedding_dim: Length of the vectors, as the full model class computes them.
        scoring: "softmax" over labels or per-label "sigmoid".
        scale: Multiplier of cosine similarities in scores (exp(logit_scale), 1/temperature).
        bias: Added to scaled similarities (SigLIP's logit_bias; 0 otherwise).
        context_length: Most text tokens (special tokens included); longer text is truncated.
        pad_to: Pad every text to this many tokens, or None to pad to the longest row.
        lowercase: Lowercase text before tokenising.
        attention_mask: Pass an attention mask to the text tower.
        image_inputs: "pixels" or "naflex".
        max_num_patches: NaFlex only: the patch budget images are resized to fit.
        fidelity: Per engine, per precision, the lowest cosine to the reference (torch fp32) measured on
            sample texts and images at registration ({"torch": {"bf16": ...}, "openvino": {"fp32": ...}};
            OpenVINO "int8" is the int8 image IR's, on held-out calibration images); the runtime's
            "default" reads it (runtime.pick_runtime). The reference itself is not listed.
        unavailable: Per engine, per tower that has no files for it, why (that tower runs on the reference
            engine); "int8" names why no int8 IR was kept.
        measurement_notes: Per "engine precision" pair ("torch bf16", "openvino int8"), what its
            measurement at registration found beside the cosine: why it raised (it is then never
            the default), or on which images int8 was judged (registry.precision, registry.quantize).
        pad_id: The id padded text positions take (the tokenizer's pad token, else its EOS).
        tokenizer: "tokenizers" where the bare `tokenizer.json` gave the same ids as the family's
            transformers tokenizer on the sample texts at registration (then no transformers is
            needed to serve), else "transformers".
        image_spec: The image preprocessing (stages.preprocess.ImageSpec.to_dict), read once.
        ir_weights: Per tower with an OpenVINO IR, how its weights are stored ("fp32", "fp16" or "int8"),
            chosen by measurement at registration (registry.weights); `fidelity["openvino"]` was measured
            on these IRs. Empty for artifacts registered before the choice (fp32).
        speed: The rows/s each pair "default" may take ran at on each tower at registration, and where
            ({"hardware": runtime.hardware_id(), "rows_per_s": {tower: {engine: {precision: rows/s}}}},
            registry.speed); on that hardware "default" takes the fastest that held the gate where it ran
            runtime.MEASURED_MARGIN times the fixed order's choice or faster. Empty where nothing was timed:
            one candidate, CUDA, an unknown CPU, `registry.engine_order: fixed` or `engines: false`, or
            registered before issue 39.
    """

    family: str
    embedding_dim: int
    scoring: str
    scale: float
    bias: float
    context_length: int
    pad_to: int | None
    lowercase: bool
    attention_mask: bool
    image_inputs: str = "pixels"
    max_num_patches: int | None = None
    fidelity: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    unavailable: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    measurement_notes: dict[str, str] = dataclasses.field(default_factory=dict)
    pad_id: int | None = None
    tokenizer: str = "transformers"
    image_spec: dict | None = None
    ir_weights: dict[str, str] = dataclasses.field(default_factory=dict)
    speed: dict = dataclasses.field(default_factory=dict)

    def speeds_here(self, tower: str) -> dict[str, dict[str, float]] | None:
        """{engine: {precision: rows/s}} measured for `tower` at registration where this is the machine it was
        measured on (runtime.hardware_id), else None."""
        from clip_pyfunc.runtime import hardware_id

        here = hardware_id()
        if not self.speed or here is None or self.speed.get("hardware") != here:
            return None
        return self.speed.get("rows_per_s", {}).get(tower)

    def to_dict(self) -> dict:
        """The stored record, without `measurement_notes`: they are registration's to report (the summary and the
        version tags), and the reader before this one fails on a field it does not know."""
        values = dataclasses.asdict(self)
        values.pop("measurement_notes")
        return values

    def write(self, artifact_dir: str) -> None:
        """Write `clip_pyfunc.json` into a tower artifact."""
        with open(os.path.join(artifact_dir, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def read(cls, artifact_dir: str) -> CheckpointInfo:
        """Read the `clip_pyfunc.json` an artifact carries.

        Raises:
            ModelLoadError: Missing or malformed.
        """
        from clip_pyfunc.stages.preprocess import ImageSpec

        path = os.path.join(artifact_dir, INFO_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                return from_record(cls, _upgrade(json.load(f)), where=path, nested={"image_spec": ImageSpec})
        except (OSError, ValueError, TypeError) as e:
            raise ModelLoadError(f"cannot read the checkpoint description {path}: {e}") from e


# Fields of records written before the fidelity table (issue 37): old field -> (table, engine).
_LEGACY_TABLES = {"precision_cosine": ("fidelity", "torch"), "openvino_cosine": ("fidelity", "openvino"),
                  "openvino_fallback": ("unavailable", "openvino")}


def _upgrade(record):
    """A stored description with per-engine fields (`precision_cosine`, `openvino_cosine`, `openvino_fallback`)
    read into the engine x precision tables (`fidelity`, `unavailable`); newer records pass unchanged."""
    if not isinstance(record, dict) or not any(name in record for name in _LEGACY_TABLES):
        return record
    record = dict(record)
    for name, (table, engine) in _LEGACY_TABLES.items():
        values = record.pop(name, None)
        if values:
            record.setdefault(table, {}).setdefault(engine, dict(values))
    return record


def from_record(cls, values: dict, *, where: str, nested: dict | None = None):
    """Build a dataclass from a record an artifact stores, ignoring the fields this version does not know.

    A newer clip-pyfunc may add fields; an older one (a Spark worker or notebook with the installed
    package) still reads the artifact. The fields it does not know, top level and inside `nested`
    records, are named in one logged warning and dropped; missing required fields still fail.

    Args:
        cls: The dataclass.
        values: The stored record (a JSON object).
        where: The file, for messages.
        nested: {field: dataclass} for fields that hold another stored record as a dict; only its
            unknown keys are dropped, it stays a dict.

    Returns:
        The dataclass instance.

    Raises:
        ValueError: The record is not an object. TypeError: A required field is missing.
    """
    if not isinstance(values, dict):
        raise ValueError(f"expected a JSON object, got {type(values).__name__}")
    values, unknown = _known(cls, values)
    for name, inner in (nested or {}).items():
        if isinstance(values.get(name), dict):
            values[name], inner_unknown = _known(inner, values[name])
            unknown += [f"{name}.{key}" for key in inner_unknown]
    if unknown:
        logger.warning("%s: ignoring field(s) this clip-pyfunc does not know (written by a newer version?): %s",
                       where, ", ".join(unknown))
    return cls(**values)


def _known(cls, values: dict) -> tuple[dict, list[str]]:
    """(the values of cls's fields, the names of the other keys in stored order)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}, [str(k) for k in values if k not in names]


def export_towers(checkpoint: ResolvedCheckpoint, workdir: str) -> tuple[CheckpointInfo, dict[str, str]]:
    """Load the checkpoint once with its family's full model class and write one artifact per tower.

    Each artifact holds the full config.json, `model.safetensors` with only the weights its
    tower needs (the encoder, the projection or head the family keeps at the top level, and
    the scoring scalars) under the full model's own names, its tokenizer or image processor,
    and `clip_pyfunc.json` (the CheckpointInfo). Weights are saved in fp32, the reference
    precision. Because the full model class is what loads the checkpoint, shapes follow it
    whatever the sub-configs say.

    Returns:
        (the checkpoint's description, {"text": dir, "image": dir}).

    Raises:
        ModelLoadError: The checkpoint lacks files or weights, or its towers disagree on the dimension.
    """
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoTokenizer

    from clip_pyfunc.families import family_for

    family = family_for(checkpoint.model_type, where=checkpoint.source)
    try:
        with quiet_transformers():
            model = getattr(transformers, family.model_class).from_pretrained(checkpoint.path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
            image_processor = AutoImageProcessor.from_pretrained(checkpoint.path, backend="pil")
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load {checkpoint.source} as a {family.model_class}: {e}") from e
    model.eval()
    info = describe(model, family, tokenizer, image_processor)
    from clip_pyfunc.stages.preprocess import read_image_spec

    info = dataclasses.replace(info, image_spec=read_image_spec(checkpoint.path).to_dict())
    scalars = [name for name, p in model.named_parameters(recurse=False)]
    state = model.state_dict()
    dirs = {}
    for tower in TOWERS:
        target = os.path.join(workdir, f"{tower}_tower")
        os.makedirs(target, exist_ok=True)
        keep = set(family.children(tower))
        tensors = {k: v.contiguous() for k, v in state.items() if k.split(".")[0] in keep or k in scalars}
        if not any(k.split(".")[0] in keep for k in tensors):
            raise ModelLoadError(f"{checkpoint.source} has no weights for the {tower} tower ({sorted(keep)})")
        save_file(tensors, os.path.join(target, WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(target)
        (tokenizer if tower == "text" else image_processor).save_pretrained(target)
        if tower == "text":
            info = dataclasses.replace(info, tokenizer=_bare_tokenizer_matches(tokenizer, target))
        dirs[tower] = target
    for target in dirs.values():  # both towers carry the same description, so each loads on its own;
        info.write(target)         # registration (registry.build) writes the measured one over it once
    return info, dirs


def export_engine_files(info: CheckpointInfo, towers: dict[str, str], references: dict) -> CheckpointInfo:
    """Run each engine's exporter (runtime.engines: an engine's `exporter` module, its `export`) on the towers.

    Args:
        info: The description.
        towers: {"text": dir, "image": dir}.
        references: {tower: the tower loaded on the reference engine}, which exporters convert from.

    Returns:
        The description with `unavailable[engine]` = {tower: why it has no files for that engine}.
    """
    import importlib

    from clip_pyfunc.runtime.engines import engine_classes

    unavailable = dict(info.unavailable)
    for engine in engine_classes():
        if engine.exporter:
            unavailable[engine.name] = importlib.import_module(engine.exporter).export(info, towers, references)
    return dataclasses.replace(info, unavailable=unavailable)


def _bare_tokenizer_matches(tokenizer, artifact_dir: str) -> str:
    """"tokenizers" when the saved `tokenizer.json` alone gives the transformers tokenizer's ids on the
    sample texts (so a served model needs no transformers), else "transformers"."""
    from clip_pyfunc.stages.preprocess import load_fast_tokenizer

    texts = ["a red circle", "a photo of a cat", "", "A PHOTO of a DOG, running!", "ünïcödé ✓ 一张猫的照片", "  spaced\tout\n text ",
                                  "the cat is on the mat " * 40, "don't <b>tags</b> & emoji 🙂 1,234.5"]
    try:
        bare = load_fast_tokenizer(artifact_dir)
    except ModelLoadError:
        return "transformers"
    with quiet_transformers():  # the long row is meant to overflow: no "longer than the maximum" warning
        want = tokenizer(texts, add_special_tokens=True, truncation=False, padding=False)["input_ids"]
    got = [e.ids for e in bare.encode_batch(texts, add_special_tokens=True)]
    return "tokenizers" if got == [list(w) for w in want] else "transformers"


def describe(model, family, tokenizer, image_processor) -> CheckpointInfo:
    """Describe a loaded full model: dimension (from one forward per tower), scoring, text rules."""
    import torch
    from PIL import Image

    scalars = {name: float(p.detach().reshape(-1)[0]) for name, p in model.named_parameters(recurse=False)
               if p.numel() == 1}
    text_cfg = model.config.text_config
    tok_max = getattr(tokenizer, "model_max_length", None)
    context = int(text_cfg.max_position_embeddings) - family.position_offset
    if isinstance(tok_max, int) and 0 < tok_max < context:
        context = tok_max  # the tokenizer's own limit (e.g. 64 for ALIGN's BERT) is the reference's
    lowercase = bool(family.lowercase(tokenizer))
    attention_mask = "attention_mask" in getattr(tokenizer, "model_input_names", ["attention_mask"])
    with torch.inference_mode():
        ids = tokenizer(["a photo"], return_tensors="pt")
        text_kwargs = {"input_ids": ids["input_ids"]}
        if attention_mask:
            text_kwargs["attention_mask"] = ids["attention_mask"]
        text_dim = features(model.get_text_features(**text_kwargs)).shape[-1]
        pixels = image_processor(images=[Image.new("RGB", (64, 48), (120, 30, 200))], return_tensors="pt")
        image_dim = features(model.get_image_features(**dict(pixels))).shape[-1]
    if text_dim != image_dim:
        raise ModelLoadError(f"text vectors have {text_dim} dimensions but image vectors {image_dim}; not one space")
    return CheckpointInfo(
        family=family.model_type, embedding_dim=int(text_dim), scoring=family.scoring,
        scale=float(family.scale(scalars)), bias=float(family.bias(scalars)),
        context_length=context, pad_to=int(text_cfg.max_position_embeddings) if family.pad_to_max_length else None,
        lowercase=lowercase, attention_mask=attention_mask, image_inputs=family.image_inputs,
        pad_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        max_num_patches=getattr(image_processor, "max_num_patches", None) if family.image_inputs == "naflex" else None,
    )

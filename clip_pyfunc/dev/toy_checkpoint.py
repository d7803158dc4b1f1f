"""A tiny CLIP trained from scratch on generated coloured shapes: the offline demo's real answers.

It is a toy: 32 x 32 images of one coloured shape (circle, square, triangle, ...) on a varied
background, paired with captions such as "a small blue triangle on a grey background". It knows
nothing else. Training is seeded and deterministic (fixed data, fixed thread count) and takes
about a minute on 2 cores; the checkpoint is saved in transformers CLIP format with a real
byte-level BPE tokenizer trained on its captions, and `config.json` records its zero-shot
accuracy on held-out generated images (`clip_pyfunc_toy`), so that everything downstream can
label its vectors as a toy's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

from clip_pyfunc.artifacts.checkpoint import TOY_KEY, TOY_WARNING

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (150, 50, 190)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15)}
SIZE = 32  # the tower's input; images are drawn at twice this and downscaled, as big inputs are
LABELS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
TEMPLATE = "a {}"
LR = 2e-3


def draw(colour: str, shape: str, rng, background: str | None = None, size_word: str | None = None):
    """One generated RGB image (PIL, 2*SIZE square) and its caption.

    Position, size, rotation, background (a flat colour or a gradient) and pixel noise vary.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    side = 2 * SIZE
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size_word = size_word or ("small" if rng.random() < 0.5 else "large")
    base = np.array(BACKGROUNDS[background], dtype=np.float32)
    ramp = np.linspace(-1, 1, side, dtype=np.float32)[None, :, None] * rng.uniform(-25, 25)
    canvas = np.clip(base + ramp + np.zeros((side, side, 3), np.float32), 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas, "RGB")
    radius = side * (rng.uniform(0.17, 0.23) if size_word == "small" else rng.uniform(0.28, 0.36))
    cx, cy = (rng.uniform(radius + 1, side - radius - 1) for _ in range(2))
    # Tilted up to 25 degrees: fully free rotation makes a tiny ViT's shape learning far slower.
    angle = (-math.pi / 2 if shape == "triangle" else math.pi / 4) + rng.uniform(-0.44, 0.44)
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        corners = 4 if shape == "square" else 3
        r = radius * (1.25 if shape == "square" else 1.35)
        pen.polygon([(cx + r * math.cos(angle + 2 * math.pi * k / corners),
                      cy + r * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)], fill=fill)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (side, side, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    caption = _caption(colour, shape, background, size_word, rng)
    return img, caption


def _caption(colour: str, shape: str, background: str, size_word: str, rng) -> str:
    forms = [f"a {colour} {shape}", f"a {size_word} {colour} {shape}", f"a {colour} {shape} on a {background} background",
             f"a {size_word} {colour} {shape} on a {background} background", f"a photo of a {colour} {shape}"]
    return forms[rng.integers(len(forms))]


def dataset(n: int, seed: int):
    """n generated (image, caption, label index) triples, classes balanced."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        colour, shape = LABELS[i % len(LABELS)].split()
        img, caption = draw(colour, shape, rng)
        out.append((img, caption, i % len(LABELS)))
    return out


def tokenizer_for(captions):
    """A CLIP byte-level BPE tokenizer (OpenAI's vocabulary layout) trained on the captions."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    eow = "</w>"
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=eow))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, end_of_word_suffix=eow, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(captions, trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + eow for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges=merges,
                         model_max_length=77)


def train_toy_checkpoint(path: str, *, seed: int = 0, steps: int = 1500, batch: int = 120, images: int = 9000,
                         held_out_images: int = 300, log=print) -> dict:
    """Train the toy CLIP and save it to `path`.

    Args:
        path: Directory to write (transformers CLIP format).
        seed: Seeds data, initialisation and batch order: the same seed gives the same weights.
        steps: Optimiser steps.
        batch: Image-caption pairs per step.
        images: Generated image-caption pairs to train on (generating them is most of a short run's time).
        held_out_images: Generated images the zero-shot accuracy is measured on.
        log: Where progress lines go.

    Returns:
        {"path", "zero_shot_accuracy", "held_out_images", "labels", "seconds", "seed"}.
    """
    import numpy as np
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from clip_pyfunc.stages.preprocess import crop_to_array, read_image_spec, resize_and_crop
    from clip_pyfunc.dev.random_checkpoint import save_checkpoint

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed thread count keeps the float sums, so the weights, reproducible
    torch.manual_seed(seed)
    try:
        train = dataset(images, seed)
        held_out = dataset(held_out_images, seed + 1)
        tokenizer = tokenizer_for([c for _, c, _ in train] + [TEMPLATE.format(x) for x in LABELS])
        config = CLIPConfig(
            projection_dim=64,
            text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=32,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                               image_size=SIZE, patch_size=8),
        )
        model = CLIPModel(config)
        processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
        spec_dir = os.path.join(path, ".spec")
        processor.save_pretrained(spec_dir)
        spec = read_image_spec(spec_dir)

        def pixels(items):
            return torch.from_numpy(np.stack([crop_to_array(resize_and_crop(img, spec), spec) for img, _, _ in items]))

        def tokens(texts):
            enc = tokenizer(texts, padding=True, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]

        images = pixels(train)
        ids, mask = tokens([c for _, c, _ in train])
        classes = torch.tensor([k for _, _, k in train])
        optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LR, total_steps=steps, pct_start=0.1)
        order = torch.Generator().manual_seed(seed)
        colour_of = classes // len(SHAPES)
        model.train()
        for step in range(steps):
            # Colour alone separates random batches, and shape is learnt late if at all: every other
            # batch holds two colours only, so telling shapes apart is what lowers its loss.
            if step % 2:
                two = torch.randperm(len(COLOURS), generator=order)[:2]
                pool = torch.nonzero((colour_of == two[0]) | (colour_of == two[1])).squeeze(1)
                pick = pool[torch.randint(0, len(pool), (batch,), generator=order)]
            else:
                pick = torch.randint(0, len(train), (batch,), generator=order)
            batch_pixels = images[pick]  # mirrored at random: a mirrored shape keeps its caption
            batch_pixels = torch.where(torch.rand(len(pick), 1, 1, 1, generator=order) < 0.5,
                                       batch_pixels.flip(3), batch_pixels)
            img = model.get_image_features(pixel_values=batch_pixels).pooler_output
            txt = model.get_text_features(input_ids=ids[pick], attention_mask=mask[pick]).pooler_output
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            logits = model.logit_scale.exp() * img @ txt.T
            # Pairs of the same colour and shape are positives too (a batch repeats classes).
            same = (classes[pick][:, None] == classes[pick][None, :]).float()
            target = same / same.sum(dim=1, keepdim=True)
            loss = (torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
                    + torch.sum(-target * logits.log_softmax(dim=0).T, dim=1).mean()) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if step % 100 == 0 or step == steps - 1:
                log(f"toy-checkpoint: step {step + 1}/{steps} loss {loss.item():.3f}")
        model.eval()
        with torch.no_grad():
            img = model.get_image_features(pixel_values=pixels(held_out)).pooler_output
            txt = model.get_text_features(*tokens([TEMPLATE.format(x) for x in LABELS])).pooler_output
            pred = (img / img.norm(dim=-1, keepdim=True) @ (txt / txt.norm(dim=-1, keepdim=True)).T).argmax(dim=1)
            accuracy = float((pred == torch.tensor([k for _, _, k in held_out])).float().mean())
        seconds = round(time.perf_counter() - start, 1)
        info = {"task": "coloured shapes on generated backgrounds", "labels": list(LABELS), "template": TEMPLATE,
                "zero_shot_accuracy": round(accuracy, 4), "held_out_images": len(held_out), "seed": seed,
                "note": TOY_WARNING}
        setattr(model.config, TOY_KEY, info)
        save_checkpoint(path, model, tokenizer, processor)
        shutil.rmtree(spec_dir, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
    log(f"toy-checkpoint: zero-shot accuracy {accuracy:.3f} on {len(held_out)} held-out images ({seconds} s)")
    return {"path": path, "zero_shot_accuracy": round(accuracy, 4), "held_out_images": len(held_out),
            "labels": list(LABELS), "seconds": seconds, "seed": seed}

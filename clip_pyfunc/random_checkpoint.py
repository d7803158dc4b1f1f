"""Randomly initialised CLIP checkpoints in transformers format, for tests and benchmarks.

Their vectors are meaningless: they stand in for real weights where the hub cannot be
reached. `config.json` carries `clip_pyfunc_random_init` so that everything downstream
(registry tags, the CLI summary, the benchmark) can say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RANDOM_INIT_KEY = "clip_pyfunc_random_init"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few frequent English pairs so the tiny BPE does real merging, not only bytes.
_MERGES = ["t h", "i n", "a n", "e r", "o n", "th e</w>", "o f</w>", "i s</w>", "c a", "ca t</w>"]


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """Shapes of a CLIP architecture (transformers CLIPConfig terms)."""

    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    vocab_size: int = 49408
    context_length: int = 77


ARCHITECTURES = {
    "tiny": Architecture(
        embed_dim=32, text_width=32, text_layers=2, text_heads=4,
        vision_width=32, vision_layers=2, vision_heads=4, image_size=32, patch_size=8,
    ),
    "vit-b-32": Architecture(
        embed_dim=512, text_width=512, text_layers=12, text_heads=8,
        vision_width=768, vision_layers=12, vision_heads=12, image_size=224, patch_size=32,
    ),
    "vit-b-16": Architecture(
        embed_dim=512, text_width=512, text_layers=12, text_heads=8,
        vision_width=768, vision_layers=12, vision_heads=12, image_size=224, patch_size=16,
    ),
    "vit-l-14": Architecture(
        embed_dim=768, text_width=768, text_layers=12, text_heads=12,
        vision_width=1024, vision_layers=24, vision_heads=16, image_size=224, patch_size=14,
    ),
}


def build_tokenizer():
    """Return a small byte-level BPE CLIPTokenizer (every byte, a few merges, CLIP's specials)."""
    from transformers import CLIPTokenizer
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in _MERGES]
    tokens += ["</w>", BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in _MERGES])


def save_random_checkpoint(path: str, arch: str = "tiny", seed: int = 0) -> str:
    """Write a randomly initialised CLIP (weights, tokenizer, image processor) to `path`.

    Args:
        path: Target directory (created).
        arch: One of ARCHITECTURES.
        seed: torch seed, so two calls give the same weights.

    Returns:
        The directory written.

    Raises:
        ValueError: `arch` is not a known architecture.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    a = ARCHITECTURES[arch]
    tokenizer = build_tokenizer()
    config = CLIPConfig(
        projection_dim=a.embed_dim,
        text_config=dict(
            vocab_size=a.vocab_size, hidden_size=a.text_width, intermediate_size=4 * a.text_width,
            num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads,
            max_position_embeddings=a.context_length, projection_dim=a.embed_dim,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=a.vision_width, intermediate_size=4 * a.vision_width,
            num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_heads,
            image_size=a.image_size, patch_size=a.patch_size, projection_dim=a.embed_dim,
        ),
    )
    setattr(config, RANDOM_INIT_KEY, arch)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    crop = {"height": a.image_size, "width": a.image_size}
    CLIPImageProcessorPil(size={"shortest_edge": a.image_size}, crop_size=crop).save_pretrained(path)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

"""Randomly initialised dual-encoder checkpoints in transformers format, for tests and benchmarks.

Their vectors are meaningless: they stand in for real weights where the hub cannot be
reached. `config.json` carries `clip_pyfunc_random_init` so that everything downstream
(registry tags, the CLI summary, the benchmark) can say so. Each family gets a real tokenizer
of its kind, trained here on a small caption corpus: byte-level BPE (CLIP), SentencePiece
unigram (SigLIP), Gemma-style BPE with byte fallback (SigLIP 2), BERT WordPiece (ALIGN,
Chinese-CLIP) and XLM-R style unigram (AltCLIP, MetaCLIP 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clip_pyfunc.artifacts.checkpoint import RANDOM_INIT_KEY

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
    family: str = "clip"
    mlp_width: int | None = None  # None: 4x the width (CLIP); SigLIP so400m uses 4304 for 1152


# The shapes of real checkpoints (openai/clip-vit-*, google/siglip-*), in Architecture's field order.
_FIELDS = ("embed_dim", "text_width", "text_layers", "text_heads", "vision_width", "vision_layers", "vision_heads",
           "image_size", "patch_size")
_SIGLIP = {"vocab_size": 32000, "context_length": 64, "family": "siglip"}
_SHAPES = {
    "tiny": ((32, 32, 2, 4, 32, 2, 4, 32, 8), {}),
    "vit-b-32": ((512, 512, 12, 8, 768, 12, 12, 224, 32), {}),
    "vit-b-16": ((512, 512, 12, 8, 768, 12, 12, 224, 16), {}),
    "vit-l-14": ((768, 768, 12, 12, 1024, 24, 16, 224, 14), {}),
    "siglip-base-patch16-224": ((768, 768, 12, 12, 768, 12, 12, 224, 16), _SIGLIP),
    "siglip-so400m-patch14-384": ((1152, 1152, 27, 16, 1152, 27, 16, 384, 14), {**_SIGLIP, "mlp_width": 4304}),
}
ARCHITECTURES = {name: Architecture(**dict(zip(_FIELDS, shape)), **extra) for name, (shape, extra) in _SHAPES.items()}
CORPUS = [
    "a photo of a cat", "a photo of a dog", "a photo of a bird", "a picture of an apple", "a red circle",
    "a small blue triangle on a grey background", "this is a photo of a red car", "a blurry photo of a house",
    "an image of two cats sleeping", "a drawing of a tree on a hill", "the dog is running in the park",
    "A Photo Of The Ocean At Sunset.", "a painting of a horse, in oil", "a cartoon of a happy robot!",
    "black and white photo of a city street", "a man riding a bike", "a woman reading a book",
    "une photo d'un chat", "ein Foto von einem Hund", "一张猫的照片", "el mar de noche", "ünïcödé ✓",
]


def build_tokenizer():
    """Return a small byte-level BPE CLIPTokenizer (every byte, a few merges, CLIP's specials)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in _MERGES]
    tokens += ["</w>", BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in _MERGES], model_max_length=77)


def save_random_checkpoint(path: str, arch: str = "tiny", seed: int = 0) -> str:
    """Write a randomly initialised checkpoint (weights, tokenizer, image processor) to `path`.

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

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    a = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model, tokenizer, image_processor = _BUILDERS[a.family](a)
    setattr(model.config, RANDOM_INIT_KEY, arch)
    save_checkpoint(path, model.eval(), tokenizer, image_processor)
    return path


def save_checkpoint(path: str, model, tokenizer, image_processor) -> str:
    """Save a model, tokenizer and image processor the way hub checkpoints are laid out."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def _clip(a: Architecture):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        projection_dim=a.embed_dim,
        text_config=dict(
            vocab_size=a.vocab_size, hidden_size=a.text_width, intermediate_size=a.mlp_width or 4 * a.text_width,
            num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads,
            max_position_embeddings=a.context_length, projection_dim=a.embed_dim,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=a.vision_width, intermediate_size=a.mlp_width or 4 * a.vision_width,
            num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_heads,
            image_size=a.image_size, patch_size=a.patch_size, projection_dim=a.embed_dim,
        ),
    )
    crop = {"height": a.image_size, "width": a.image_size}
    return CLIPModel(config), tokenizer, CLIPImageProcessorPil(size={"shortest_edge": a.image_size}, crop_size=crop)


def _siglip(a: Architecture):
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tokenizer = gemma_tokenizer(model_max_length=a.context_length)
    common = dict(intermediate_size=a.mlp_width or 4 * a.text_width)
    config = SiglipConfig(
        text_config=dict(vocab_size=max(a.vocab_size, len(tokenizer)), hidden_size=a.text_width,
                         num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads,
                         max_position_embeddings=a.context_length, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **common),
        vision_config=dict(hidden_size=a.vision_width, num_hidden_layers=a.vision_layers,
                           num_attention_heads=a.vision_heads, image_size=a.image_size, patch_size=a.patch_size,
                           **common),
    )
    model = SiglipModel(config)
    _pretrained_like_scalars(model)
    return model, tokenizer, SiglipImageProcessorPil(size={"height": a.image_size, "width": a.image_size})


def _pretrained_like_scalars(model) -> None:
    """SigLIP initialises logit_scale and logit_bias at 0; released models hold about log(10) and -10."""
    import math

    import torch

    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)


_BUILDERS = {"clip": _clip, "siglip": _siglip}


def gemma_tokenizer(cls=None, **options):
    """A Gemma-style tokenizer (BPE with byte fallback, '▁' for spaces) trained on CORPUS, set up
    as SigLIP 2 ships it: EOS appended, no BOS, right padding, no attention mask, no lowercasing."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                  special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)])
    bpe.train_from_iterator(CORPUS * 20, trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    settings = dict(add_bos_token=False, add_eos_token=True, padding_side="right",
                    model_input_names=["input_ids"], model_max_length=64)
    settings.update(options)
    return (cls or GemmaTokenizer)(vocab=bpe.get_vocab(), merges=merges, **settings)


def sentencepiece_tokenizer(workdir: str, **options):
    """SigLIP's tokenizer: a SentencePiece unigram model trained on CORPUS (EOS appended, lowercasing
    and punctuation stripping by the tokenizer itself, no attention mask)."""
    import io

    import sentencepiece
    from transformers import SiglipTokenizer

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=120, hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, minloglevel=2, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>")
    os.makedirs(workdir, exist_ok=True)
    model_file = os.path.join(workdir, "spiece.model")
    with open(model_file, "wb") as f:
        f.write(buf.getvalue())
    return SiglipTokenizer(vocab_file=model_file, model_input_names=["input_ids"], model_max_length=64, **options)


def wordpiece_tokenizer(**options):
    """A BERT WordPiece tokenizer trained on CORPUS (lowercasing, CJK characters split)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(lowercase=True, handle_chinese_chars=True)
    wp.train_from_iterator(CORPUS * 5, vocab_size=300, min_frequency=1, show_progress=False)
    return BertTokenizer(vocab=wp.get_vocab(), do_lower_case=True, **options)


def unigram_tokenizer(**options):
    """An XLM-R style unigram tokenizer over CORPUS's words and characters (<s>=0 <pad>=1 </s>=2 <unk>=3)."""
    import math
    from collections import Counter

    from transformers import XLMRobertaTokenizer

    counts: Counter = Counter()
    for line in CORPUS:
        for word in line.split():
            counts["▁" + word] += 1
            counts.update(word)
        counts["▁"] += 1
    total = sum(counts.values())
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, math.log(c / total) - (0 if len(p) > 2 else 5.0)) for p, c in counts.most_common()]
    return XLMRobertaTokenizer(vocab=vocab + [("<mask>", 0.0)], **options)


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

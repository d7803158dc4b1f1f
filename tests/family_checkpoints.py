"""Tiny random test checkpoints, one per family, each with a real tokenizer of its kind.

Random weights: the vectors are meaningless, and only parity with the family's own full model
is tested on them. Shapes are tiny (width 32, 2 layers) so each builds in about a second.
"""

from __future__ import annotations

import os

import torch

from clip_pyfunc.dev.random_checkpoint import (
    _pretrained_like_scalars, build_tokenizer, gemma_tokenizer, save_checkpoint, sentencepiece_tokenizer,
    unigram_tokenizer, wordpiece_tokenizer,
)

IMG = 32
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMG, patch_size=8)


def _ids(tok) -> dict:
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)


def clip_bigg(path: str):
    """LAION bigG's layout (transformers issue 25622): the top-level projection_dim (24) is what
    CLIPModel builds, while the sub-configs keep the default 512."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tok = build_tokenizer()
    config = CLIPConfig(projection_dim=24, text_config=dict(TEXT, max_position_embeddings=77, **_ids(tok)),
                        vision_config=VISION)
    assert config.text_config.projection_dim == 512 and config.vision_config.projection_dim == 512
    crop = {"height": IMG, "width": IMG}
    return CLIPModel(config), tok, CLIPImageProcessorPil(size={"shortest_edge": IMG}, crop_size=crop)


def siglip(path: str):
    """SigLIP 1: SentencePiece tokenizer, square bicubic resize, no crop."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tok = sentencepiece_tokenizer(os.path.join(path + "-spm"))
    model = SiglipModel(SiglipConfig(text_config=dict(TEXT, max_position_embeddings=64, **_ids(tok)),
                                     vision_config=VISION))
    _pretrained_like_scalars(model)
    return model, tok, SiglipImageProcessorPil(size={"height": IMG, "width": IMG})


def siglip2_fixres(path: str):
    """SigLIP 2 at fixed resolution: model_type siglip with a Gemma tokenizer and bilinear resize."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tok = gemma_tokenizer()
    model = SiglipModel(SiglipConfig(text_config=dict(TEXT, max_position_embeddings=64, **_ids(tok)),
                                     vision_config=VISION))
    _pretrained_like_scalars(model)
    return model, tok, SiglipImageProcessorPil(size={"height": IMG, "width": IMG}, resample=2)


def siglip2(path: str):
    """SigLIP 2 NaFlex: patch 4, at most 16 patches (the released models: 16 and 256)."""
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    tok = gemma_tokenizer()
    vision = {k: v for k, v in VISION.items() if k != "image_size"}
    model = Siglip2Model(Siglip2Config(text_config=dict(TEXT, max_position_embeddings=64, **_ids(tok)),
                                       vision_config=dict(vision, patch_size=4, num_patches=16)))
    _pretrained_like_scalars(model)
    return model, tok, Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16)


def align(path: str):
    """ALIGN: BERT text, a small EfficientNet, the align-base processor settings (resize, crop,
    rescale to [-1, 1], no normalisation)."""
    from transformers import AlignConfig, AlignModel, EfficientNetImageProcessorPil

    tok = wordpiece_tokenizer(model_max_length=64)
    vision = dict(image_size=IMG, width_coefficient=1.0, depth_coefficient=1.0, depth_divisor=8,
                  kernel_sizes=[3, 3], in_channels=[32, 16], out_channels=[16, 24], strides=[2, 2],
                  num_block_repeats=[1, 1], expand_ratios=[1, 2], depthwise_padding=[], hidden_dim=64)
    text = dict(TEXT, max_position_embeddings=64, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = AlignModel(AlignConfig(text_config=text, vision_config=vision, projection_dim=24))
    with torch.no_grad():
        for m in model.vision_model.modules():
            if isinstance(m, torch.nn.Conv2d):  # ALIGN's init (std 0.02) makes a tiny net's output input-blind
                torch.nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so parity tests them
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    side = round(IMG * 346 / 289)
    processor = EfficientNetImageProcessorPil(
        size={"height": side, "width": side}, crop_size={"height": IMG, "width": IMG}, do_center_crop=True,
        rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False, include_top=False, resample=2)
    return model, tok, processor


def chinese_clip(path: str):
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessorPil, ChineseCLIPModel

    tok = wordpiece_tokenizer(model_max_length=52, tokenize_chinese_chars=True)
    text = dict(TEXT, max_position_embeddings=64, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = ChineseCLIPModel(ChineseCLIPConfig(text_config=text, vision_config=VISION, projection_dim=16))
    return model, tok, ChineseCLIPImageProcessorPil(size={"height": IMG, "width": IMG}, do_center_crop=False)


def altclip(path: str):
    from transformers import AltCLIPConfig, AltCLIPModel, CLIPImageProcessorPil

    tok = unigram_tokenizer(model_max_length=77)
    text = dict(TEXT, max_position_embeddings=80, project_dim=24, **_ids(tok))
    model = AltCLIPModel(AltCLIPConfig(text_config=text, vision_config=VISION, projection_dim=16))
    crop = {"height": IMG, "width": IMG}
    return model, tok, CLIPImageProcessorPil(size={"shortest_edge": IMG}, crop_size=crop)


def metaclip_2(path: str):
    from transformers import CLIPImageProcessorPil, MetaClip2Config, MetaClip2Model

    tok = unigram_tokenizer(model_max_length=77)
    text = dict(TEXT, max_position_embeddings=77, **_ids(tok))  # eos_token_id = the tokenizer's </s>
    model = MetaClip2Model(MetaClip2Config(text_config=text, vision_config=VISION, projection_dim=16))
    crop = {"height": IMG, "width": IMG}
    return model, tok, CLIPImageProcessorPil(size={"shortest_edge": IMG}, crop_size=crop)


BUILDERS = {"clip_bigg": clip_bigg, "siglip": siglip, "siglip2_fixres": siglip2_fixres, "siglip2": siglip2,
            "align": align, "chinese_clip": chinese_clip, "altclip": altclip, "metaclip_2": metaclip_2}


def build(name: str, path: str, seed: int = 0) -> str:
    """Write the named tiny checkpoint to `path` and return it."""
    torch.manual_seed(seed)
    model, tokenizer, image_processor = BUILDERS[name](path)
    setattr(model.config, "clip_pyfunc_random_init", f"tiny-{name}")
    return save_checkpoint(path, model.eval(), tokenizer, image_processor)

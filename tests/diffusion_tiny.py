"""Tiny diffusers components built from configs (no download), shared by the diffusion tests and their DDP worker."""

from __future__ import annotations

import string

import pytest
import torch


PROMPTS = ("a square", "vertical stripes", "horizontal stripes", "a frame")


@pytest.fixture
def fresh_accelerate_state():
    """
    accelerate's `AcceleratorState` is shared by the whole process and GARDOTrainer refuses one made with another
    `mixed_precision`: start each test without one, and leave none behind for the tests of other modules.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_denoiser(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=8,
        pooled_projection_dim=8,
        pos_embed_max_size=8,
    )


class TinyPrompts:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.hidden = torch.randn(len(PROMPTS), 2, 8, generator=g)
        self.pooled = torch.randn(len(PROMPTS), 8, generator=g)

    def __call__(self, prompts):
        ids = torch.tensor([PROMPTS.index(p) for p in prompts])
        return self.hidden[ids], self.pooled[ids]


def mean_brightness(images, prompts=None):
    return images.flatten(1).mean(1)


def pixel_std(images, prompts=None):
    return images.flatten(1).std(1)


def red_minus_blue(images, prompts=None):
    return (images[:, 0] - images[:, 2]).flatten(1).mean(1)


def tiny_setup(seed: int = 0) -> dict:
    """Keyword arguments of `GARDOTrainer` for a tiny, untrained pixel-space SD3 transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "denoiser": tiny_denoiser(seed),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "encode_prompts": TinyPrompts(seed),
        "prompts": list(PROMPTS),
        "reward_fn": mean_brightness,
        "aux_reward_fns": [pixel_std, red_minus_blue],
        "eval_prompts": list(PROMPTS[:2]),
        "eval_fns": {"redness": red_minus_blue},
    }


def tiny_config(tmp_dir: str, **overrides):
    from regtune.diffusion import GARDOConfig

    fields = {
        "output_dir": str(tmp_dir),
        "num_epochs": 3,
        "prompts_per_epoch": 2,
        "num_generations": 4,
        "num_inference_steps": 3,
        "lora_r": 2,
        "lora_alpha": 4,
        "learning_rate": 1e-2,
        "clip_range": 0.2,
        "gate_init": 0.6,  # the top 60% of the few non-negative uncertainties of a tiny batch: some are gated
        "gate_max": 0.9,
        "eval_every": 2,
        "eval_generations": 2,
        "beta": 1.0,
    }
    fields.update(overrides)
    return GARDOConfig(**fields)


# ---- a complete tiny StableDiffusion3Pipeline (as diffusers' own tests build it, with an offline tokenizer) ----


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def tiny_sd3_pipeline(seed: int = 0):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    clip_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=80,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )

"""Tiny random-weight diffusers pipelines (no hub, no network) for the decorator and ``qdiff demo`` tests.

The transformers come from :mod:`tests.tiny_models` (4x16x16 latents); the UNets are slimmer
versions of its UNets (no mid-block attention / no mid block: Dynamo traces them in about half the
time), 3x16x16 pixels or 4x16x16 latents. The VAE has two blocks (latents 16x16 -> images 32x32). Text pipelines need ``transformers`` (the ``pipelines``
test extra): the tokenizers are built in memory from a 36-character vocabulary (no vocab files to
download), the text encoders are 2-layer CLIP / T5 encoders with 32-wide states.

=========================  =====================  ============================================
factory                    denoiser               conditioning (CFG doubles the batch)
=========================  =====================  ============================================
tiny_ddpm_pipeline         ``unet`` UNet2DModel   none
tiny_ddim_pipeline         ``unet`` UNet2DModel   none
tiny_dit_pipeline          ``transformer`` DiT    class labels 0..999 (1000 = null label)
tiny_sd_pipeline           ``unet`` UNet2DCond.   CLIP prompt states (B, 16, 32)
tiny_pixart_pipeline       ``transformer`` PixArt T5 prompt states (B, 120, 32) + attention mask
=========================  =====================  ============================================
"""

from __future__ import annotations

import string

import pytest
import torch

from tests.tiny_models import tiny_dit, tiny_pixart

_CHARS = string.ascii_lowercase + string.digits
CLIP_LENGTH = 16  # tokenizer.model_max_length of the tiny CLIP tokenizer (SD pads prompts to it)


def require_transformers():
    """Skip the calling test with a clear message when the optional ``transformers`` is absent."""
    return pytest.importorskip(
        "transformers", minversion="5", reason="text-encoder pipelines need transformers >= 5 (in-memory tokenizers): pip install -e '.[pipelines]'"
    )


def tiny_vae(seed: int = 0):
    """``AutoencoderKL``: 3 -> 4 channels, downsampling x2 (two blocks of 8 and 16 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    return vae.eval()


def tiny_unet(seed: int = 0):
    """``UNet2DModel`` on 3x16x16 pixels: channels (16, 32), attention in the second block only."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=16, add_attention=False,
    ).eval()


def tiny_cond_unet(seed: int = 0):
    """``UNet2DConditionModel`` on 4x16x16 latents: channels (32, 64), cross attention, no mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None, layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
    ).eval()


def tiny_ddpm_pipeline(seed: int = 0):
    from diffusers import DDPMPipeline, DDPMScheduler

    return DDPMPipeline(unet=tiny_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=1000))


def tiny_ddim_pipeline(seed: int = 0):
    from diffusers import DDIMPipeline, DDIMScheduler

    return DDIMPipeline(unet=tiny_unet(seed), scheduler=DDIMScheduler(num_train_timesteps=1000))


def tiny_dit_pipeline(seed: int = 0):
    """``DiTPipeline`` with a DDIM scheduler and labels named ``class0`` ... ``class999``."""
    from diffusers import DDIMScheduler, DiTPipeline

    id2label = {i: f"class{i}" for i in range(1000)}
    return DiTPipeline(transformer=tiny_dit(seed).model, vae=tiny_vae(seed), scheduler=DDIMScheduler(), id2label=id2label)


def tiny_clip(seed: int = 0):
    """(CLIPTokenizer, CLIPTextModel) with a character vocabulary and 32-wide states."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LENGTH)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CLIP_LENGTH, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return tokenizer, CLIPTextModel(config).eval()


def tiny_t5(seed: int = 0):
    """(T5Tokenizer, T5EncoderModel) with a unigram character vocabulary and 32-wide states."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return tokenizer, T5EncoderModel(config).eval()


def tiny_sd_pipeline(seed: int = 0):
    """``StableDiffusionPipeline`` (DDIM, no safety checker) around the tiny cross-attention UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer, text_encoder = tiny_clip(seed)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_cond_unet(seed),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_pixart_pipeline(seed: int = 0):
    """``PixArtAlphaPipeline`` (DPM-Solver++) around the tiny PixArt transformer; call it with
    ``use_resolution_binning=False, clean_caption=False`` (binning knows only the full-size models)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    tokenizer, text_encoder = tiny_t5(seed)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed), transformer=tiny_pixart(seed).model,
        scheduler=DPMSolverMultistepScheduler(),
    )

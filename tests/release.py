"""Build a release-shaped diffusers folder from random tiny components, exactly as the reference libraries
save them (diffusers' and transformers' `save_pretrained`), so tests exercise the real import path."""

import json
from pathlib import Path

import torch

TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    norm_num_groups=8,
    use_linear_projection=True,
    class_embed_type="timestep",
    flip_sin_to_cos=True,
    freq_shift=0,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    scaling_factor=0.18215,
    sample_size=32,
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=256,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=0,
    projection_dim=64,
)
SD2_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def randomize(module, seed):
    """Non-trivial random weights everywhere (diffusers zero-inits some output layers, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)  # norm gains near 1
            elif p.ndim == 1:
                p.copy_(0.1 * noise)  # biases
            else:
                p.copy_(noise / p[0].numel() ** 0.5)  # fan-in scaled, keeps activations O(1)
    return module


def write_tokenizer(folder):
    """HF CLIPTokenizer files written from open_clip's own BPE vocabulary (the same one)."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    names = {
        "<start_of_text>": "<|startoftext|>",
        "<end_of_text>": "<|endoftext|>",
    }  # HF's spelling, same ids
    vocab = {names.get(tok, tok): i for tok, i in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "!",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )


def make_release(folder, in_channels=4, seed=0, prediction_type="epsilon", level=True):
    """Write a tiny Text2Earth-shaped release to `folder` (level=False: SD2-base-shaped, no class embedding);
    returns the reference modules (eval, fp32)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet_cfg = {**TINY_UNET, "class_embed_type": "timestep" if level else None}
    unet = randomize(
        UNet2DConditionModel(in_channels=in_channels, out_channels=4, **unet_cfg), seed
    )
    vae = randomize(AutoencoderKL(**TINY_VAE), seed + 1)
    text = randomize(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), seed + 2)
    scheduler = DDIMScheduler(**{**SD2_SCHEDULER, "prediction_type": prediction_type})
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text.eval(),
        "scheduler": scheduler,
    }

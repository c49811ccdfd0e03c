"""Tiny random base models for tests, built offline and deterministically (diffusers test habit).

Three layouts ``FrozenBase.from_pretrained`` must load (docs/families.md):

- ``make_tiny_sd``: a Stable-Diffusion-1.5-layout directory (latent, x8 VAE, CLIP text
  encoder + CLIP BPE tokenizer, PNDM with SD 1.5's scheduler config, ``model_index.json``).
- ``make_tiny_pixel_base``: the pixel, text-conditional base in the ``shapes32`` format,
  made by ``mcm.training.base_pretraining`` itself (``BasePretrainModule`` -> ``export_base``).
- ``make_tiny_unconditional``: a pixel ``UNet2DModel`` + ``DDPMScheduler``, no text.

Import from any test as ``from tiny_models import make_tiny_sd`` (pytest puts ``tests/`` on
``sys.path``); the session fixtures in ``conftest.py`` build each one once.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Stable Diffusion 1.5's scheduler/scheduler_config.json (PNDM) minus the _class_name and version keys
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "prediction_type": "epsilon",
}
TINY_SD_TEXT_HIDDEN = 32
TINY_SD_MAX_LENGTH = 77
TINY_SD_VOCAB_SIZE = 1000
TINY_PIXEL_SIZE = 16
TINY_PIXEL_MAX_LENGTH = 24
TINY_PIXEL_TEXT_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer with a tiny vocabulary (bytes, bytes + ``</w>``, a few merges, specials).

    Built from in-memory vocab/merges so nothing is fetched from the hub; every string
    tokenizes (byte fallback), ``model_max_length`` is 77 as in Stable Diffusion.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in ("a", "red", "blue", "circle", "square", "photo", "of", "cat", "dog"):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: r e d</w> -> re d</w> -> red</w>
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
                vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    assert len(vocab) <= TINY_SD_VOCAB_SIZE, len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_SD_MAX_LENGTH)


def make_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable-Diffusion-1.5-layout directory to ``path`` and return it.

    UNet 4 -> 4 channels at 8x8 latents; VAE with 4 blocks (x8 downsampling, 4 latent
    channels) so 64x64 images <-> 8x8 latents; CLIP text encoder of width 32, 77 tokens.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_SD_TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=64)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=TINY_SD_VOCAB_SIZE, hidden_size=TINY_SD_TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_SD_MAX_LENGTH, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)  # as the real file is read
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)  # unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json
    return path


def make_tiny_pixel_base(path: str | Path, seed: int = 0) -> Path:
    """The tiny pixel text-conditional base in the ``shapes32`` format (16x16, v-prediction).

    Made exactly as pretraining makes the shipped one: ``BasePretrainModule`` with tiny sizes,
    then ``export_base(module.ema_base(), path)`` (random weights, no training).
    """
    from mcm.training.base_pretraining import BasePretrainModule, export_base

    torch.manual_seed(seed)
    module = BasePretrainModule(sample_size=TINY_PIXEL_SIZE, block_out_channels=(16, 32), layers_per_block=1,
                                text_hidden=TINY_PIXEL_TEXT_HIDDEN, text_layers=1, max_length=TINY_PIXEL_MAX_LENGTH,
                                preview_every_n_steps=0)
    return Path(export_base(module.ema_base(), path))


def make_tiny_unconditional(path: str | Path, seed: int = 0) -> Path:
    """A tiny unconditional pixel base: ``UNet2DModel`` 3 -> 3 channels at 16x16 + ``DDPMScheduler``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=TINY_PIXEL_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        path, safe_serialization=True)  # unet/ scheduler/ model_index.json
    return path


def _tiny_clip_config(tokenizer, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=TINY_SD_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=TINY_SD_MAX_LENGTH,
                          projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def make_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """A tiny random SDXL-layout directory: two CLIP encoders (the second with projection), a ``text_time``
    UNet at 8x8 latents, an x2 VAE (16x16 images), Euler (as SDXL snapshots ship), ``model_index.json``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1)  # 80 = 6 time ids x 8 + the 32-d pooled text
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_dit(path: str | Path, seed: int = 0) -> Path:
    """A tiny random DiT directory: class-conditional ``DiTTransformer2DModel`` (learned sigma, 1000
    classes + the null class) at 8x8 latents, an x2 VAE (16x16 images), DDIM, ``model_index.json``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8,
                                        activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero", norm_elementwise_affine=False)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(
        path, safe_serialization=True)
    return path


def make_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """A tiny random SD3 directory: ``SD3Transformer2DModel`` at 8x8 latents, two CLIP encoders with
    projection, no T5 (``text_encoder_3`` absent, as diffusers allows), an x2 VAE with shift and scaling
    factors (16x16 images), ``FlowMatchEulerDiscreteScheduler`` (shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer))
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_t5_tokenizer():
    """A T5 tokenizer built offline: a Unigram model over lowercase letters, digits and a few words (what
    ``T5TokenizerFast`` loads from ``tokenizer.json``; no sentencepiece file, nothing fetched)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = ["a", "red", "blue", "green", "circle", "square", "ring", "triangle", "cross", "and", "photo", "of", "the"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -2.0) for w in words] + [
        (c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'"] + [("\u2581", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def make_tiny_pixart_sigma(path: str | Path, seed: int = 0) -> Path:
    """A tiny random PixArt-Σ directory (diffusers' own test sizes): ``PixArtTransformer2DModel`` at 8x8
    latents with a learned variance (8 output channels), a tiny T5 encoder and tokenizer, an x2 VAE (16x16
    images), DDIM; saved by ``PixArtSigmaPipeline.save_pretrained``."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0))
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler())
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny random FLUX.1 directory (dev-like with ``guidance_embeds``, schnell-like without):
    ``FluxTransformer2DModel`` over 2x2-packed latents of an x2 VAE with 4 latent channels (so 16 input channels),
    CLIP (pooled) + a tiny T5, ``FlowMatchEulerDiscreteScheduler`` with FLUX's dynamic shift; saved by
    ``FluxPipeline.save_pretrained``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                             eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ---- local annotators / judges (transformers) -------------------------------------------------------

TINY_SEGMENTER_LABELS = {0: "wall", 1: "person", 2: "car", 3: "sky"}


def jitter(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Random matrices large enough that outputs vary over the image (the default init is nearly flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_tiny_segformer(path: Path) -> Path:
    """A tiny random SegFormer (4 labels, TINY_SEGMENTER_LABELS) saved with its image processor."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                          decoder_hidden_size=16, num_labels=4, id2label=TINY_SEGMENTER_LABELS,
                          label2id={v: k for k, v in TINY_SEGMENTER_LABELS.items()})
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(cfg)
    with torch.no_grad():  # spread the logits so that every class wins somewhere
        model.decode_head.classifier.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def make_tiny_dpt(path: Path) -> Path:
    """A tiny random DPT depth model saved with its image processor."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    cfg = DPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], fusion_hidden_size=16,
                    reassemble_factors=[2, 1], head_in_index=-1)
    torch.manual_seed(0)
    model = DPTForDepthEstimation(cfg)
    jitter(model, 1)
    with torch.no_grad():
        model.head.head[4].bias.fill_(1.0)  # the head ends in a ReLU: keep most pixels above 0
    model.save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return path


def tiny_qwen_tokenizer():
    """A Qwen2 tokenizer built offline: byte-level BPE over the 256 byte symbols (no merges) plus Qwen's chat
    specials (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``), what ``Qwen2Tokenizer`` loads from
    ``tokenizer.json``; every string tokenizes, nothing is fetched."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = list(_bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                          bos_token=None, model_max_length=4096)


def make_tiny_qwenimage(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen-Image directory (diffusers' own test sizes): ``QwenImageTransformer2DModel`` over
    2x2-packed latents of an ``AutoencoderKLQwenImage`` (x4, 4 channels), a tiny ``Qwen2_5_VLForConditionalGeneration``
    text encoder with the byte-level tokenizer above, ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's dynamic
    shift; saved by ``QwenImagePipeline.save_pretrained``."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 0.8, 1.0, 2.0])
    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed + 2)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "vocab_size": 512, "bos_token_id": 256, "eos_token_id": 258},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=512, vision_end_token_id=300, vision_start_token_id=301, vision_token_id=302,
        bos_token_id=256, eos_token_id=258)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_gemma_tokenizer():
    """A Gemma tokenizer built offline: a Unigram model over characters and a few words, ``<bos>`` first as
    Gemma's post-processor puts it (what ``GemmaTokenizer`` loads from ``tokenizer.json``; nothing fetched)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GemmaTokenizer

    words = ["a", "red", "blue", "green", "circle", "square", "ring", "and", "the", "of", "prompt", "user"]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.:'->\n"
    pieces = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0)] + [
        ("\u2581" + w, -2.0) for w in words] + [(c, -5.0) for c in chars] + [("\u2581", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return GemmaTokenizer(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                          unk_token="<unk>")


def make_tiny_sana(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Sana directory (diffusers' own test sizes, but 2 blocks so that a ControlNet has one to add
    to): ``SanaTransformer2DModel`` (learned sigma: 8 output channels for 4 latent ones) over an x2 ``AutoencoderDC``,
    a tiny ``Gemma2Model`` with the tokenizer above, and Sana's DPM-Solver++ for flow (``flow_prediction``, flow
    sigmas, ``flow_shift`` 3); saved by
    ``SanaPipeline.save_pretrained``."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    path = Path(path)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=8, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=32)
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=64,
                                            max_position_embeddings=8192, num_attention_heads=2, num_hidden_layers=1,
                                            num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0,
                                            eos_token_id=1, bos_token_id=2, attn_implementation="eager"))
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            num_train_timesteps=1000)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


#: a Qwen3-style chat template (one turn, the generation prompt, an empty thinking block when thinking is off)
TINY_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def make_tiny_zimage(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Z-Image directory (diffusers' own test sizes): ``ZImageTransformer2DModel`` over an x2
    ``AutoencoderKL`` with 16 latent channels (FLUX's scaling and shift), a tiny ``Qwen3Model`` with the byte-level
    tokenizer above and a Qwen3-style chat template, ``FlowMatchEulerDiscreteScheduler`` with the dynamic shift;
    saved by ``ZImagePipeline.save_pretrained``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # initialised with torch.empty (diffusers' test fixes them the same way)
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159)
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = TINY_QWEN3_CHAT_TEMPLATE
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=512,
                                          max_position_embeddings=512, bos_token_id=256, eos_token_id=258))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def zero_mcm(base):
    """A small zero-initialised segmentation MCM for ``base`` (the oracles' "zero MCM equals the pipeline")."""
    from mcm.models.modulator import MultimodalConditioningModule

    torch.manual_seed(0)
    return MultimodalConditioningModule(latent_channels=base.latent_channels, modalities={"segmentation": {"num_classes": 6}},
                                        downsample=base.downsample, block_out_channels=(16, 32), layers_per_block=1,
                                        attention_levels=(), norm_num_groups=8).eval()


#: a Mistral-style chat template over FLUX.2's message lists (system, then user; content as typed parts)
TINY_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' %}[INST]{%- for c in message['content'] %}"
    "{%- if c['type'] == 'text' %}{{ c['text'] }}{%- else %}[IMG]{%- endif %}{%- endfor %}[/INST]"
    "{%- endif %}{%- endfor %}")


def tiny_pixtral_processor():
    """FLUX.2's tokenizer component built offline: a ``PixtralProcessor`` around a byte-level BPE tokenizer (the 256
    byte symbols, no merges) with Mistral's specials and the chat template above (what ``AutoProcessor`` loads from
    ``tokenizer/``; nothing fetched)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    alphabet = list(_bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                            "[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        model_max_length=4096)
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=16,
                            spatial_merge_size=1, chat_template=TINY_MISTRAL_CHAT_TEMPLATE)


def make_tiny_flux2(path: str | Path, seed: int = 0) -> Path:
    """A tiny random FLUX.2 [dev] directory: ``Flux2Transformer2DModel`` (guidance embedding) over the patchified
    latents of an x2 ``AutoencoderKLFlux2`` (4 channels, 16 patchified; random batch-norm statistics), a tiny
    ``Mistral3ForConditionalGeneration`` with 30 text layers (the pipeline reads layers 10, 20, 30: 3 x 16 = 48
    channels) and the processor above, ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting; saved by
    ``Flux2Pipeline.save_pretrained``."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    path = Path(path)
    processor = tiny_pixtral_processor()
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 30,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
                     "vocab_size": len(processor.tokenizer), "max_position_embeddings": 1024, "rope_theta": 1e6},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "patch_size": 16, "image_size": 64},
        image_token_index=processor.tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1,
        projector_hidden_act="gelu", vision_feature_layer=-1)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2),
                                          guidance_embeds=True)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             sample_size=32)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor,
                  transformer=transformer).save_pretrained(path, safe_serialization=True)
    return path


def train_and_export(module, batch: dict, tmp_path: Path, steps: int = 2):
    """``steps`` training steps of an adapter LightningModule on ``batch`` (its optimiser, train mode), then its
    checkpoint exported and loaded back as ``mcm.pipelines.load_module`` does: ``(last loss, loaded adapter)``; the
    base's content hash is checked unchanged."""
    from mcm.pipelines import load_module
    from mcm.training.export import export_checkpoint

    before = module.base.content_hash()
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    for step in range(steps):
        opt.zero_grad()
        loss = module.training_step(batch, step)
        loss.backward()
        opt.step()
    module.base._hash = None
    assert module.base.content_hash() == before, "training changed the frozen base"
    ckpt = {"state_dict": module.state_dict(), "global_step": steps}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "adapter.ckpt")
    loaded, _ = load_module(export_checkpoint(tmp_path / "adapter.ckpt", tmp_path / "export", use_ema=False),
                            module.base)
    return loss, loaded

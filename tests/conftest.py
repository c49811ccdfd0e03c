"""Shared test setup: offline, wandb off, one torch thread; session-scoped tiny base directories."""
from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import make_tiny_pixel_base, make_tiny_sd, make_tiny_unconditional  # noqa: E402

# Tiny models are fastest on one thread; and with a second process busy on this 2-core machine,
# two OpenMP threads made a training step ~100x slower (4.7 s vs 0.05 s, measured). MCM_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MCM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random Stable-Diffusion-1.5-layout directory (latent, x8 VAE, CLIP text, PNDM)."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_pixel_base_dir(tmp_path_factory):
    """A tiny pixel text-conditional base in the shapes32 format (exported by base_pretraining)."""
    return make_tiny_pixel_base(tmp_path_factory.mktemp("tiny_pixel_base"))


@pytest.fixture(scope="session")
def tiny_uncond_dir(tmp_path_factory):
    """A tiny unconditional pixel base (UNet2DModel + DDPMScheduler)."""
    return make_tiny_unconditional(tmp_path_factory.mktemp("tiny_uncond"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from tiny_models import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    from tiny_models import make_tiny_dit

    return make_tiny_dit(tmp_path_factory.mktemp("tiny_dit"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from tiny_models import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def seg_dir(tmp_path_factory):
    """A tiny random SegFormer directory (labels wall, person, car, sky)."""
    from tiny_models import make_tiny_segformer

    return make_tiny_segformer(tmp_path_factory.mktemp("segformer"))


@pytest.fixture(scope="session")
def depth_dir(tmp_path_factory):
    """A tiny random DPT depth directory."""
    from tiny_models import make_tiny_dpt

    return make_tiny_dpt(tmp_path_factory.mktemp("dpt"))


@pytest.fixture(scope="session")
def tiny_pixart_sigma_dir(tmp_path_factory):
    from tiny_models import make_tiny_pixart_sigma

    return make_tiny_pixart_sigma(tmp_path_factory.mktemp("tiny_pixart_sigma"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random FLUX.1-dev-like directory (guidance embedding)."""
    from tiny_models import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="session")
def tiny_flux2_dir(tmp_path_factory):
    """A tiny random FLUX.2 [dev] directory (Mistral-3 text encoder and its Pixtral processor, patchified latents)."""
    from tiny_models import make_tiny_flux2

    return make_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2"))


@pytest.fixture(scope="session")
def tiny_qwenimage_dir(tmp_path_factory):
    """A tiny random Qwen-Image directory (Qwen2.5-VL text encoder, ``AutoencoderKLQwenImage``)."""
    from tiny_models import make_tiny_qwenimage

    return make_tiny_qwenimage(tmp_path_factory.mktemp("tiny_qwenimage"))


@pytest.fixture(scope="session")
def tiny_sana_dir(tmp_path_factory):
    """A tiny random Sana directory (Gemma-2 text encoder, ``AutoencoderDC``, DPM-Solver++ for flow)."""
    from tiny_models import make_tiny_sana

    return make_tiny_sana(tmp_path_factory.mktemp("tiny_sana"))


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory):
    """A tiny random Z-Image directory (Qwen3 text encoder with a chat template, FLUX-style VAE)."""
    from tiny_models import make_tiny_zimage

    return make_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"))

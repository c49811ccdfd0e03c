"""The transformer ControlNet baselines (issue 27 item 4): SD3, FLUX.1, Qwen-Image and Sana, each through diffusers'
own ControlNet class, equal to diffusers' own ControlNet pipeline on tiny random models, and trainable in the same
harness.

diffusers' pipelines VAE-encode an RGB control image; ours turn modality maps into a latent-size conditioning
(``mcm.models.latent_controlnet``).  So the reference pipeline's ``vae.encode`` is replaced by one that returns our
conditioning with the pipeline's normalisation undone: from there on, everything (the ControlNet's inputs, timesteps,
prompts, guidance, packing, the residuals' place in the frozen transformer, the scheduler) must match.  The
ControlNets' zero-initialised layers are randomised first, so the residuals do move the images."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import diffusers
import pytest
import torch

from mcm.models.frozen_base import FrozenBase
from mcm.pipelines import MCMPipeline
from tiny_models import train_and_export

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TOL = 1e-5
PROMPTS = ["a red circle", "a blue square and a ring"]
H, W = 32, 64  # non-square


def gen():
    return torch.Generator().manual_seed(0)


def _scaled(vae, latent):
    return latent / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)


def _unscaled(vae, latent):  # SD3 with force_zeros_for_pooled_projection (the default): no shift either
    return latent / vae.config.scaling_factor


def _qwen(vae, latent):
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return latent[:, :, None] * std + mean


#: family -> (diffusers' ControlNet pipeline, its extra loading arguments, its guidance arguments (ours: ref's),
#: the VAE latent that gives our conditioning after the pipeline's normalisation, the adapter's kind)
CASES = {
    "sd3": ("StableDiffusion3ControlNetPipeline", dict(text_encoder_3=None, tokenizer_3=None),
            [({"guidance_scale": 1.0}, {"guidance_scale": 1.0}), ({"guidance_scale": 5.0}, {"guidance_scale": 5.0})],
            _unscaled, "sd3_controlnet"),
    "flux": ("FluxControlNetPipeline", {}, [({"guidance_scale": 3.5}, {"guidance_scale": 3.5})], _scaled,
             "flux_controlnet"),
    "qwenimage": ("QwenImageControlNetPipeline", {},
                  [({"guidance_scale": 4.0}, {"true_cfg_scale": 4.0})], _qwen, "qwenimage_controlnet"),
    "sana": ("SanaControlNetPipeline", {},
             [({"guidance_scale": 1.0}, {"guidance_scale": 1.0, "use_resolution_binning": False}),
              ({"guidance_scale": 4.5, "negative_prompt": "blurry"},
               {"guidance_scale": 4.5, "negative_prompt": "blurry", "use_resolution_binning": False})],
             _unscaled, "sana_controlnet"),
    "zimage": ("ZImageControlNetPipeline", {},
               [({"guidance_scale": 0.0}, {"guidance_scale": 0.0}),
                ({"guidance_scale": 3.0, "negative_prompt": ["blurry", "dark"]},
                 {"guidance_scale": 3.0, "negative_prompt": ["blurry", "dark"]})], _scaled, "zimage_controlnet"),
}


def fresh(kwargs: dict) -> dict:
    """Copies of the list arguments: ZImagePipeline rewrites the caller's prompt lists in place."""
    return {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def randomised_adapter(base):
    from mcm.models.adapter_kinds import kind_of
    from mcm.models.controlnet import ControlNetAdapter

    torch.manual_seed(0)
    adapter = ControlNetAdapter.from_base(base, {"segmentation": {"num_classes": 3}})  # 3 channels, latent's 4
    with torch.no_grad():  # the zero-initialised input and output layers: random, so the residuals matter
        for name, p in adapter.controlnet.named_parameters():
            if torch.count_nonzero(p) == 0 and p.ndim == 2:
                p.normal_(0, 0.3)
    return adapter.eval(), kind_of(adapter).name


def fixed_encode(latent, unnormalise, vae):
    """A ``vae.encode`` returning ``unnormalise(latent)`` for any image batch (tiled to the batch the pipeline
    encodes: twice ours under SD3's batched guidance)."""
    def encode(images, *args, **kwargs):
        z = unnormalise(vae, latent)
        z = z.repeat(images.shape[0] // z.shape[0], *[1] * (z.ndim - 1))
        dist = SimpleNamespace(sample=lambda generator=None: z, mode=lambda: z)
        return SimpleNamespace(latent_dist=dist, latent=z, latents=z)
    return encode


@pytest.mark.parametrize("family", list(CASES))
def test_transformer_controlnet_equals_the_familys_controlnet_pipeline(family, request):
    pipeline, load_kw, calls, unnormalise, kind = CASES[family]
    path = request.getfixturevalue(f"tiny_{family}_dir")
    base = FrozenBase.from_pretrained(path)
    adapter, got_kind = randomised_adapter(base)
    assert got_kind == kind
    labels = torch.randint(0, 3, (2, H, W), generator=gen())
    size = (H // base.downsample, W // base.downsample)
    state = adapter.encode_conditions({"segmentation": labels}, None, size, 2)
    latent = state
    if adapter.packed:  # the pipeline packs after encoding: hand it the spatial latent
        latent = getattr(diffusers, "FluxPipeline")._unpack_latents(state, H, W, base.downsample)
    # a copy: Z-Image's pipeline attaches its transformer's modules to the ControlNet it is given, for good
    ref = getattr(diffusers, pipeline).from_pretrained(path, controlnet=copy.deepcopy(adapter.controlnet), **load_kw)
    ref.set_progress_bar_config(disable=True)
    ref.vae.encode = fixed_encode(latent.float(), unnormalise, ref.vae)
    pipe = MCMPipeline.from_base(base, [adapter])
    pipe.set_progress_bar_config(disable=True)
    alone = MCMPipeline.from_base(base, [])
    alone.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=3, height=H, width=W, output_type="pt")
    for ours_kw, ref_kw in calls:  # fresh prompt lists: ZImagePipeline rewrites the caller's in place
        expected = ref(prompt=list(PROMPTS), **common, **fresh(ref_kw), control_image=torch.zeros(2, 3, H, W),
                       controlnet_conditioning_scale=0.7, generator=gen()).images
        got = pipe(prompt=list(PROMPTS), **common, **fresh(ours_kw), conditions={"segmentation": labels},
                   conditioning_scale=0.7, generator=gen()).images
        assert got.shape == expected.shape == (2, 3, H, W)
        assert float((got - expected).abs().max()) < TOL, (family, ours_kw)
        plain = alone(prompt=list(PROMPTS), **common, **fresh(ours_kw), generator=gen()).images
        # the ControlNet does change the images
        assert float((got - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["qwenimage", "sana", "zimage"])
def test_new_transformer_controlnets_train_export_and_reload(family, request, tmp_path):
    """Qwen-Image's, Sana's and Z-Image's ControlNets in ``ControlNetModule``: zero-initialised (the base's images at
    step 0), a step moves them and not the base, and the export reloads as the same kind."""
    from mcm.training.controlnet_module import ControlNetModule

    path = request.getfixturevalue(f"tiny_{family}_dir")
    torch.manual_seed(0)
    m = ControlNetModule(base=str(path), modalities={"segmentation": {"num_classes": 4}}, warmup_steps=0, lr=1e-3,
                         modality_dropout=0.0, drop_all_prob=0.0)
    kind = CASES[family][4]
    assert m.adapter.adapter_key == kind
    labels = torch.randint(0, 4, (2, H, W), generator=gen())
    kw = dict(num_inference_steps=2, height=H, width=W, output_type="pt", guidance_scale=1.0)
    alone = MCMPipeline.from_base(m.base, [])
    alone.set_progress_bar_config(disable=True)
    at_init = MCMPipeline.from_base(m.base, [m.adapter])
    at_init.set_progress_bar_config(disable=True)
    base_images = alone(prompt=list(PROMPTS), **kw, generator=gen()).images
    assert float((at_init(prompt=list(PROMPTS), conditions={"segmentation": labels}, **kw, generator=gen()).images
                  - base_images).abs().max()) < TOL
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(2, 3, H, W, generator=g) * 2 - 1,
             "segmentation": torch.randint(0, 4, (2, H, W), generator=g), "caption": list(PROMPTS)}
    loss, loaded = train_and_export(m, batch, tmp_path)
    assert torch.isfinite(loss)
    assert type(loaded) is type(m.adapter)
    for (k, a), b in zip(m.adapter.controlnet.state_dict().items(), loaded.controlnet.state_dict().values()):
        assert torch.equal(a, b), k
    trained = MCMPipeline.from_base(m.base, [loaded])
    trained.set_progress_bar_config(disable=True)
    moved = trained(prompt=list(PROMPTS), conditions={"segmentation": labels}, **kw, generator=gen()).images
    assert float((moved - base_images).abs().max()) > 1e-5
    if family == "zimage":  # the transformer's shared modules are lent per forward: never saved, never trained
        assert not any(k.startswith(("t_embedder", "noise_refiner", "cap_embedder", "x_pad_token"))
                       for k in loaded.controlnet.state_dict())
        assert all(p.requires_grad for p in m.adapter.parameters())
        with pytest.raises(ValueError, match="takes one number per step"):
            trained(prompt=list(PROMPTS), conditions={"segmentation": labels}, **kw, generator=gen(),
                    conditioning_scale=torch.rand(H, W, generator=gen()))
    wide = m.base.latent_channels
    with pytest.raises(ValueError, match=f"at most the latent's {wide}"):
        type(m.adapter).from_base(m.base, {"segmentation": {"num_classes": wide + 2}})

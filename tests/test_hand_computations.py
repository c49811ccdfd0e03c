"""The method's formulas against hand computations, with modules off their zero init (non-zero gamma and beta),
so that every check can fail: the modulation ``p + s (p gamma + beta)``, the MCM training loss, classifier-free
guidance combined with modulation and with composition (one reference step written out here, then the
scheduler's step), and partial modulation windows on the noise level (docs/concepts.md#the-mcm).

The network outputs (the base's ``p``, the MCM's ``(gamma, beta)``) come from the modules; everything the
framework does with them is recomputed here by hand, in the order the paper writes it.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import modalities
from mcm.diffusion.control import Control, controlled_predictor, controlled_sample
from mcm.diffusion.sampling import guided
from mcm.models.frozen_base import FrozenBase
from mcm.models.modulator import MultimodalConditioningModule
from mcm.training.adapter_module import evaluation_noise
from mcm.training.mcm_module import MCMModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # steps run without a Trainer

SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8)
SEG, SKETCH = {"segmentation": {"num_classes": 6}}, {"sketch": {}}


def nudged(module: MultimodalConditioningModule, seed: int) -> MultimodalConditioningModule:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the zero init: gamma and beta are not 0
        module.unet.conv_out.weight.copy_(torch.randn(module.unet.conv_out.weight.shape, generator=g) * 0.05)
        module.unet.conv_out.bias.copy_(torch.randn(module.unet.conv_out.bias.shape, generator=g) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def setup(tiny_pixel_base_dir):
    base = FrozenBase.from_pretrained(tiny_pixel_base_dir)
    torch.manual_seed(1)
    seg = nudged(MultimodalConditioningModule(latent_channels=3, modalities=SEG, **SMALL), 1)
    torch.manual_seed(2)
    sketch = nudged(MultimodalConditioningModule(latent_channels=3, modalities=SKETCH, **SMALL), 2)
    g = torch.Generator().manual_seed(0)
    conds = {"segmentation": modalities.get("segmentation", num_classes=6).example(2, 16, 16, g),
             "sketch": modalities.get("sketch").example(2, 16, 16, g)}
    return base, seg, sketch, conds


def mod_by_hand(p: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, s) -> torch.Tensor:
    return p + s * (p * gamma + beta)


def test_modulation_is_p_plus_s_times_p_gamma_plus_beta(setup):
    base, seg, _, conds = setup
    g = torch.Generator().manual_seed(4)
    x, p = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([100, 800])
    state = seg.encode_conditions({"segmentation": conds["segmentation"]}, None, (16, 16), 2)
    with torch.no_grad():
        gamma, beta = seg.modulation(x, p, t, state)
    assert gamma.abs().min() > 0 and beta.abs().mean() > 1e-3, "gamma and beta must be non-zero for this test"
    strength_map = torch.rand(2, 1, 16, 16, generator=g)
    for s in (1.0, 0.5, 2.0, -0.7, strength_map):
        with torch.no_grad():
            out = seg.controlled_prediction(base, x, t, None, state, s, lambda: p)
        torch.testing.assert_close(out, mod_by_hand(p, gamma, beta, s), rtol=0, atol=1e-6)
    with torch.no_grad():  # the paper's form at s = 1
        out = seg.controlled_prediction(base, x, t, None, state, 1.0, lambda: p)
    torch.testing.assert_close(out, p * (1 + gamma) + beta, rtol=0, atol=1e-5)
    assert (out - p).abs().mean() > 1e-3


def test_mcm_loss_is_the_mse_of_the_modulated_prediction_against_the_target(tiny_pixel_base_dir):
    """The validation step (fixed noise per key) recomputed: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, p from the
    base, (gamma, beta) from the MCM on [x_t, p, features, presence], p_hat = p (1 + gamma) + beta, and the MSE
    against the v target sqrt(abar) eps - sqrt(1 - abar) x0 (the tiny base is a v-prediction base)."""
    torch.manual_seed(0)
    module = MCMModule(base=str(tiny_pixel_base_dir), modalities=SEG, **SMALL)
    nudged(module.mcm, 7)
    g = torch.Generator().manual_seed(3)
    B = 3
    batch = {"image": torch.rand(B, 3, 16, 16, generator=g) * 2 - 1, "caption": ["a red circle", "", "a blue square"],
             "key": ["a", "b", "c"],
             "segmentation": modalities.get("segmentation", num_classes=6).example(B, 16, 16, g)}
    with torch.no_grad():
        loss = module._common_step(batch, "val")
    base, mcm = module.base, module.mcm
    assert base.prediction_type == "v_prediction"
    x0 = batch["image"]
    eps, t = evaluation_noise(module.forward_process, batch["key"], x0)
    abar = module.forward_process.scheduler.alphas_cumprod[t].view(B, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        p = base.predict(x_t, t, base.encode_text(batch["caption"]))
        feats = mcm.encode_conditions({"segmentation": batch["segmentation"]}, torch.ones(B, 1), (16, 16), B)
        gamma, beta = mcm.modulation(x_t, p, t, feats)
    assert gamma.abs().mean() > 1e-3 and beta.abs().mean() > 1e-3
    p_hat = p * (1 + gamma) + beta
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    by_hand = ((p_hat - v) ** 2).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=0)
    assert not torch.allclose(by_hand, ((p - v) ** 2).mean(), rtol=1e-3), "the MCM must change the loss"


def _contexts(base, prompts):
    return base.encode_context(prompts, None, len(prompts)), base.uncond_context(len(prompts))


def test_guidance_with_modulation_and_composition_against_a_hand_step(setup):
    """One denoising step with guidance w = 3: both branches modulated by the same module, then
    p = p_u' + w (p_c' - p_u'); with two modules composed per branch, q = p + sum_i w_i (p_i - p);
    then the scheduler's DDIM step on that p equals ``controlled_sample`` with one step."""
    base, seg, sketch, conds = setup
    prompts, w = ["a red circle", "a blue square"], 3.0
    cond, uncond = _contexts(base, prompts)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    t = torch.tensor(601)
    f_seg = seg.encode_conditions({"segmentation": conds["segmentation"]}, None, (16, 16), 2)
    f_sk = sketch.encode_conditions({"sketch": conds["sketch"]}, None, (16, 16), 2)
    with torch.no_grad():
        p_u, p_c = base.predict(x, t, uncond), base.predict(x, t, cond)

        def modulated(module, feats, p):
            gamma, beta = module.modulation(x, p, t.expand(2), feats)
            return mod_by_hand(p, gamma, beta, 1.0)

        # one module: modulation of each branch, then guidance
        m_u, m_c = modulated(seg, f_seg, p_u), modulated(seg, f_seg, p_c)
        single = m_u + w * (m_c - m_u)
        got = guided(controlled_predictor(base, [Control(seg, {"segmentation": conds["segmentation"]})], (16, 16)),
                     cond, uncond, w)(x, t)
        torch.testing.assert_close(got, single, rtol=0, atol=5e-5)  # batched [u; c] vs one branch at a time
        assert (single - (p_u + w * (p_c - p_u))).abs().mean() > 1e-3  # the modulation matters

        # two modules composed (weights 0.7 and 1.5) in each branch, then guidance
        def composed(p):
            return p + 0.7 * (modulated(seg, f_seg, p) - p) + 1.5 * (modulated(sketch, f_sk, p) - p)

        q_u, q_c = composed(p_u), composed(p_c)
        both = q_u + w * (q_c - q_u)
        controls = [Control(seg, {"segmentation": conds["segmentation"]}, 0.7),
                    Control(sketch, {"sketch": conds["sketch"]}, 1.5)]
        got = guided(controlled_predictor(base, controls, (16, 16)), cond, uncond, w)(x, t)
        torch.testing.assert_close(got, both, rtol=0, atol=5e-5)

        # the whole step: DDIM from pure noise at its first timestep, the combined p above
        sched = DDIMScheduler.from_config(base.scheduler.config)
        sched.set_timesteps(1)
        t0 = sched.timesteps[0]
        p_u, p_c = base.predict(x, t0, uncond), base.predict(x, t0, cond)
        t = t0  # modulated() reads t
        q_u, q_c = composed(p_u), composed(p_c)
        expected = sched.step(q_u + w * (q_c - q_u), t0, x, return_dict=False)[0]
        out = controlled_sample(base, controls, 2, size=(16, 16), prompts=prompts, num_inference_steps=1, guidance_scale=w,
                                latents=x.clone(), scheduler=DDIMScheduler.from_config(base.scheduler.config))
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("window", [(0.5, 1.0), (0.0, 0.5), (0.3, 0.8)])
def test_partial_modulation_window_switches_on_the_noise_level(setup, window):
    """A hand loop: at each DDIM timestep t, the modulated prediction iff low <= t / T < high (or t / T >= 1 with
    high = 1), else the base alone; ``controlled_sample(window=...)`` must give the same samples."""
    base, seg, _, conds = setup
    steps, T = 6, base.num_train_timesteps
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    prompts = ["a red circle", "a blue square"]
    cond, _ = _contexts(base, prompts)
    feats = seg.encode_conditions({"segmentation": conds["segmentation"]}, None, (16, 16), 2)
    sched = DDIMScheduler.from_config(base.scheduler.config)
    sched.set_timesteps(steps)
    x, on = x_T.clone(), []
    with torch.no_grad():
        for t in sched.timesteps:
            p = base.predict(x, t, cond)
            frac = float(t) / T
            modulate_here = window[0] <= frac < window[1] or (window[1] >= 1.0 and frac >= 1.0)
            on.append(modulate_here)
            if modulate_here:
                gamma, beta = seg.modulation(x, p, t.expand(2), feats)
                p = mod_by_hand(p, gamma, beta, 1.0)
            x = sched.step(p, t, x, return_dict=False)[0]
        got = controlled_sample(base, [Control(seg, {"segmentation": conds["segmentation"]})], 2, size=(16, 16), prompts=prompts,
                                num_inference_steps=steps, window=window, latents=x_T.clone(),
                                scheduler=DDIMScheduler.from_config(base.scheduler.config))
        full = controlled_sample(base, [Control(seg, {"segmentation": conds["segmentation"]})], 2, size=(16, 16), prompts=prompts,
                                 num_inference_steps=steps, latents=x_T.clone(),
                                 scheduler=DDIMScheduler.from_config(base.scheduler.config))
    assert 0 < sum(on) < steps, f"the window {window} must split the {steps} steps, got {on}"
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)
    assert (got - full).abs().max() > 1e-4, "a partial window differs from modulating every step"

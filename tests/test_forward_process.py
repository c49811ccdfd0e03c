"""The training forward process comes from the base's scheduler *config* through ``DDPMScheduler``
(issue: architecture), whatever inference scheduler the directory ships.  Regression for: a base
shipped with Euler trained on ``x0 + sigma * eps`` (std up to 14); PNDM + v-prediction crashed in
``get_velocity``."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

from mcm.diffusion.forward_process import ForwardProcess, diffusion_target, min_snr_weights

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def abar(t: torch.Tensor) -> torch.Tensor:
    betas = torch.linspace(SD["beta_start"] ** 0.5, SD["beta_end"] ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)[t]


@pytest.mark.parametrize("shipped,prediction", [(EulerDiscreteScheduler, "epsilon"), (PNDMScheduler, "v_prediction"),
                                                (DDIMScheduler, "epsilon"), (DDIMScheduler, "v_prediction")])
def test_variance_preserving_x_t_and_the_right_target(shipped, prediction):
    config = shipped(**SD, prediction_type=prediction).config
    fp = ForwardProcess(config)
    assert isinstance(fp.scheduler, DDPMScheduler) and fp.prediction_type == prediction
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4096, 4, 2, 2, generator=g).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4096,), generator=g)
    x_t = fp.add_noise(x0, noise, t)
    a = abar(t)[:, None, None, None]
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-5)  # Ho et al. eq. 4, by hand
    assert x_t.abs().max() < 6  # Euler's add_noise would reach sigma_max ~ 14.6
    expected = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0  # v, Salimans & Ho
    assert torch.allclose(fp.target(x0, noise, t), expected, atol=1e-5)


def test_sample_target_and_unknown_prediction_type():
    fp = ForwardProcess(DDPMScheduler(**SD, prediction_type="sample").config)
    x0, noise, t = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([1, 999])
    assert torch.equal(fp.target(x0, noise, t), x0)
    sched = DDPMScheduler(**SD)
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(sched, x0, noise, t)


def test_min_snr_weighting_by_hand():
    sched = DDPMScheduler(**SD, prediction_type="epsilon")
    t = torch.tensor([10, 500, 990])
    a = abar(t)
    snr = a / (1 - a)
    assert torch.allclose(min_snr_weights(sched, t, 5.0), torch.clamp(snr, max=5.0) / snr, rtol=1e-4)
    fp = ForwardProcess(sched.config, weighting="min_snr", snr_gamma=5.0)
    pred, target = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2) * torch.tensor([1.0, 2.0, 3.0])[:, None, None, None]
    per_sample = torch.tensor([1.0, 4.0, 9.0])
    assert torch.allclose(fp.loss(pred, target, t), (per_sample * torch.clamp(snr, max=5.0) / snr).mean(), rtol=1e-4)
    assert torch.allclose(ForwardProcess(sched.config).loss(pred, target, t), per_sample.mean())
    with pytest.raises(ValueError, match="weighting"):
        ForwardProcess(sched.config, weighting="snr")


def test_clamped_snr_weighting_by_hand():
    """clamped_snr: x0-space weight clamp(snr, 1, gamma); for v-prediction divided by snr + 1, so the noisiest
    steps keep a weight of 1 / (snr + 1) >= 1/2 where min-SNR's snr / (snr + 1) goes to 0."""
    sched = DDPMScheduler(**SD, prediction_type="v_prediction")
    t = torch.tensor([10, 300, 600, 990])
    a = abar(t)
    snr = a / (1 - a)
    assert snr[0] > 5 and 1 < snr[1] < 5 and snr[2] < 1 and snr[3] < 0.01  # one t in each regime
    fp = ForwardProcess(sched.config, weighting="clamped_snr", snr_gamma=5.0)
    want = torch.tensor([5.0, snr[1].item(), 1.0, 1.0]) / (snr + 1)
    assert torch.allclose(fp.loss_weights(t), want.float(), rtol=1e-4)
    assert fp.loss_weights(t)[3] > 0.99 and ForwardProcess(sched.config, weighting="min_snr").loss_weights(t)[3] < 0.01
    min_snr = ForwardProcess(sched.config, weighting="min_snr").loss_weights(t)
    assert torch.allclose(fp.loss_weights(t)[:2], min_snr[:2])  # the same where snr >= 1
    with pytest.raises(ValueError, match="count twice"):
        ForwardProcess(sched.config, weighting="clamped_snr", timestep_sampling="snr")


@pytest.mark.parametrize("sampling", ["uniform", "cubic", "snr"])
def test_timestep_sampling_densities_by_hand(sampling):
    sched = DDPMScheduler(**SD, prediction_type="v_prediction")
    fp = ForwardProcess(sched.config, timestep_sampling=sampling, snr_gamma=5.0)
    k = torch.arange(1000, dtype=torch.float64)
    if sampling == "uniform":
        expected = torch.full((1000,), 1e-3, dtype=torch.float64)
    elif sampling == "cubic":  # t = floor((1 - u^3) T): P(t = k) = (1 - k/T)^(1/3) - (1 - (k+1)/T)^(1/3)
        expected = (1 - k / 1000) ** (1 / 3) - (1 - (k + 1) / 1000).clamp(min=0) ** (1 / 3)
    else:  # proportional to the v-prediction min-SNR weight min(snr, 5) / (snr + 1), from abar by hand
        snr = (abar(k.long()) / (1 - abar(k.long()))).double()
        w = snr.clamp(max=5.0) / (snr + 1)
        expected = w / w.sum()
    probs = fp.timestep_probabilities().double()
    assert torch.allclose(probs, expected, atol=1e-6) and abs(probs.sum().item() - 1) < 1e-5
    t = fp.sample_timesteps(400_000, "cpu", torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=1000).double() / t.numel()
    assert (freq - expected).abs().max() < 5e-4  # the draws follow the density (binomial std <= 1.6e-4)
    mean = {"uniform": 499.5, "cubic": 750.0, "snr": float((expected * k).sum())}[sampling]  # E[(1-u^3)T] = 3T/4
    assert abs(t.double().mean().item() - mean) < 2.0
    # validation always draws uniformly, so runs that train with different samplings validate alike
    u = fp.sample_timesteps(200_000, "cpu", torch.Generator().manual_seed(1), uniform=True)
    assert abs(u.double().mean().item() - 499.5) < 2.0
    with pytest.raises(ValueError, match="timestep_sampling"):
        ForwardProcess(sched.config, timestep_sampling="high")
    with pytest.raises(ValueError, match="count twice"):  # importance sampling and the weight it samples by
        ForwardProcess(sched.config, weighting="min_snr", timestep_sampling="snr")


def test_flow_bases_refuse_a_vp_timestep_sampling():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mcm.diffusion.forward_process import forward_process_for

    with pytest.raises(ValueError, match="flow-matching base"):
        forward_process_for(FlowMatchEulerDiscreteScheduler(), timestep_sampling="cubic")


def test_mcm_module_trains_on_the_forward_process_not_the_inference_scheduler(tiny_sd_dir, tmp_path):
    """A tiny SD base re-shipped with Euler: the training step's x_t is variance preserving."""
    import shutil

    from mcm.training.mcm_module import MCMModule

    d = tmp_path / "sd_euler"
    shutil.copytree(tiny_sd_dir, d)
    EulerDiscreteScheduler.from_pretrained(d / "scheduler").save_pretrained(d / "scheduler")
    m = MCMModule(base=str(d), modalities={"sketch": {}}, block_out_channels=(16, 32), attention_levels=())
    assert type(m.base.scheduler).__name__ == "EulerDiscreteScheduler"
    seen = {}
    orig = m.base.predict

    def spy(x_t, t, text=None):
        seen["x_t"] = x_t
        return orig(x_t, t, text)

    m.base.predict = spy
    batch = {"image": torch.rand(8, 3, 64, 64) * 2 - 1, "sketch": torch.zeros(8, 1, 64, 64),
             "caption": ["a red circle"] * 8}
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss) and seen["x_t"].abs().max() < 8

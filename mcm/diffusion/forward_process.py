"""The base's *training* forward process ``q(x_t | x_0)`` and what the adapter learns to predict.

Built as diffusers' train scripts do (``train_controlnet.py``, ``train_text_to_image.py``):
``DDPMScheduler.from_config(base scheduler config)`` keeps the base's betas, schedule,
``prediction_type`` and zero-SNR rescaling, whatever inference scheduler the directory ships.
Euler's ``add_noise`` would give ``x0 + sigma * eps`` (not variance preserving) and PNDM has
no ``get_velocity``; the forward process of training never depends on them (docs/concepts.md#the-mcm).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: min_snr: Hang et al. 2023, the x0-space weight min(snr, gamma); clamped_snr: that weight also floored at 1,
#: max(min(snr, gamma), 1) (the floor is Salimans & Ho's 2022 "truncated SNR" weighting): the same as min-SNR
#: where snr >= 1, but noisier steps keep a v-space weight of 1 / (snr + 1) >= 1/2 instead of going to zero
WEIGHTINGS = ("none", "min_snr", "clamped_snr")
#: how training draws timesteps: uniform (diffusers' train scripts); cubic, biased to high noise as in
#: T2I-Adapter (Mou et al. 2023, §3.4: t = (1 - u^3) T), where the layout is decided; snr, with probability
#: proportional to the min-SNR-gamma weight (importance sampling of min-SNR: the same expected gradient as
#: that weighting, without spending steps on timesteps it weighs near zero)
TIMESTEP_SAMPLINGS = ("uniform", "cubic", "snr")


def training_scheduler(scheduler_config: Mapping[str, Any]) -> DDPMScheduler:
    """``DDPMScheduler`` with the base's noise schedule and prediction type (any scheduler's config)."""
    return DDPMScheduler.from_config(dict(scheduler_config))


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict, per the (training) scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":  # v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, eq. 4)
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}; expected epsilon, v_prediction or sample")


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float, floor: float | None = None) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, eq. 9) for epsilon, v or x0 targets;
    ``floor``: the x0-space weight is also at least this (``clamped_snr``: 1)."""
    snr = compute_snr(scheduler, t)
    w = torch.clamp(snr, min=floor, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return w / (snr + 1)
    if kind == "epsilon":
        return w / snr
    return w  # x0 target: the weight is min(snr, gamma) itself


def pixel_mse(pred: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` mean squared error per sample, each pixel (all channels) weighted by ``pixel_weights``."""
    err = (pred.float() - target.float()).pow(2)
    if pixel_weights is not None:
        err = err * pixel_weights.to(err)
    return err.flatten(1).mean(1)


class ForwardProcess:
    """Variance-preserving training noise for epsilon / v / sample bases.

    Args:
        scheduler_config: the base's scheduler config (any diffusers scheduler).
        weighting: per-sample loss weighting, ``"none"``, ``"min_snr"`` or ``"clamped_snr"`` (:data:`WEIGHTINGS`).
        snr_gamma: gamma of min-SNR weighting (and of ``"snr"`` timestep sampling).
        timestep_sampling: how training draws ``t`` (:data:`TIMESTEP_SAMPLINGS`); validation always draws uniformly,
            so validation losses of runs that sample differently compare.
    """

    def __init__(self, scheduler_config: Mapping[str, Any], weighting: str = "none", snr_gamma: float = 5.0,
                 timestep_sampling: str = "uniform"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling: expected one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}")
        if timestep_sampling == "snr" and weighting != "none":
            raise ValueError(f"timestep_sampling='snr' already draws timesteps in proportion to the min-SNR weight; "
                             f"with loss_weighting={weighting!r} as well the weight would count twice (set "
                             f"loss_weighting: none)")
        self.scheduler = training_scheduler(scheduler_config)
        self.weighting, self.snr_gamma, self.timestep_sampling = weighting, snr_gamma, timestep_sampling

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def to(self, device: torch.device | str) -> "ForwardProcess":
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        return self

    @property
    def timestep_density(self) -> str:
        """The name of the density training draws ``t`` from: cached predictions record it (``base.json``) and
        a run training from them must draw from the same one."""
        if self.timestep_sampling == "snr":
            return f"ddpm/snr(gamma={float(self.snr_gamma):g})"
        return f"ddpm/{self.timestep_sampling}"

    def timestep_probabilities(self) -> torch.Tensor:
        """``(T,)`` probability of each integer timestep under ``timestep_sampling`` (training)."""
        T = self.num_train_timesteps
        if self.timestep_sampling == "snr":
            w = min_snr_weights(self.scheduler, torch.arange(T), self.snr_gamma).double()
            return (w / w.sum()).float()
        if self.timestep_sampling == "cubic":  # P(t = k) = P(k <= (1 - u^3) T < k + 1)
            edges = torch.arange(T + 1, dtype=torch.float64) / T
            cdf = 1 - (1 - edges).clamp(min=0) ** (1 / 3)  # P((1 - u^3) < x) = 1 - (1 - x)^(1/3)
            return (cdf[1:] - cdf[:-1]).float()
        return torch.full((T,), 1.0 / T)

    def sample_timesteps(self, batch_size: int, device: torch.device | str,
                         generator: torch.Generator | None = None, uniform: bool = False) -> torch.Tensor:
        """Integer timesteps ``(B,)`` in ``[0, T)``: uniform as diffusers' train scripts draw them (and always with
        ``uniform=True``, for validation), else drawn per ``timestep_sampling``."""
        gen_device = generator.device if generator is not None else device
        if uniform or self.timestep_sampling == "uniform":
            t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
        elif self.timestep_sampling == "cubic":
            u = torch.rand(batch_size, generator=generator, device=gen_device)
            t = ((1 - u ** 3) * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        else:
            probs = self.timestep_probabilities().to(gen_device)
            t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return t.to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4)."""
        self.to(x0.device)
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.to(x0.device)
        return diffusion_target(self.scheduler, x0, noise, t)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` per-sample weights, or ``None`` for the plain mean."""
        if self.weighting == "none":
            return None
        self.to(t.device)
        floor = 1.0 if self.weighting == "clamped_snr" else None
        return min_snr_weights(self.scheduler, t, self.snr_gamma, floor).float()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted MSE: the mean over pixels per sample (times ``pixel_weights`` ``(B, 1, h, w)``, if given),
        times the sample's weight, mean over the batch."""
        per_sample = pixel_mse(pred, target, pixel_weights)
        w = self.loss_weights(t)
        return (per_sample * w).mean() if w is not None else per_sample.mean()


class FlowMatchingProcess:
    """Rectified-flow training for flow bases (SD3; Esser et al. 2024, §3): ``x_t = (1 - sigma) x0 + sigma noise``,
    target the velocity ``noise - x0``, ``t = 1000 sigma``.

    Timesteps are drawn as diffusers' ``train_dreambooth_sd3.py`` draws them: ``u`` from
    ``compute_density_for_timestep_sampling`` (``logit_normal`` by default; ``uniform``, ``mode``), then
    the training scheduler's shifted timestep at index ``u * T``; loss weights from
    ``compute_loss_weighting_for_sd3`` (``none``, ``sigma_sqrt``, ``cosmap``).

    Args:
        scheduler_config: the base's ``FlowMatchEulerDiscreteScheduler`` config (its ``shift`` is kept).
        weighting: loss weighting scheme.
        timestep_sampling / logit_mean / logit_std / mode_scale: the density ``u`` is drawn from.
    """

    prediction_type = "flow"

    def __init__(self, scheduler_config: Mapping[str, Any], weighting: str = "none", snr_gamma: float = 5.0,
                 timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if timestep_sampling not in ("logit_normal", "uniform", "mode"):
            raise ValueError(f"timestep_sampling: expected logit_normal, uniform or mode, got {timestep_sampling!r}")
        if weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ValueError(f"weighting: expected none, sigma_sqrt or cosmap for a flow base, got {weighting!r}")
        cfg = dict(scheduler_config)
        if "flow_shift" in cfg:  # a DPM-Solver flow config (Sana): its flow_shift is the Euler scheduler's shift
            cfg["shift"] = cfg["flow_shift"]
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        self.weighting, self.timestep_sampling = weighting, timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def to(self, device: torch.device | str) -> "FlowMatchingProcess":
        return self

    @property
    def timestep_density(self) -> str:
        """The density's name with its parameters (``flow/logit_normal(mean=0,std=1)``); see ``ForwardProcess``."""
        if self.timestep_sampling == "logit_normal":
            return f"flow/logit_normal(mean={float(self.logit_mean):g},std={float(self.logit_std):g})"
        if self.timestep_sampling == "mode":
            return f"flow/mode(scale={float(self.mode_scale):g})"
        return "flow/uniform"

    def sample_timesteps(self, batch_size: int, device: torch.device | str,
                         generator: torch.Generator | None = None, uniform: bool = False) -> torch.Tensor:
        """Float timesteps ``(B,)`` (``1000 sigma``, shifted as the base's scheduler shifts them).

        ``uniform`` is the VP process's validation switch; flow matching validates on its own density.
        """
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.timestep_sampling, batch_size, self.logit_mean, self.logit_std,
                                                  self.mode_scale, generator=generator)
        idx = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.scheduler.timesteps[idx].to(device)

    def sigmas(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return (t.float() / self.num_train_timesteps).view(-1, *[1] * (ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigmas(t, x0.ndim).to(x0)
        return (1.0 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        w = compute_loss_weighting_for_sd3(self.weighting if self.weighting != "none" else "logit_normal",
                                           self.sigmas(t, pred.ndim).to(pred.device))
        # w is (B, 1, 1, 1): the same per-pixel error weighted per sample, as pixel_mse weighs it per pixel
        return (pixel_mse(pred, target, pixel_weights) * w.float().flatten()).mean()


def forward_process_for(scheduler_config: Mapping[str, Any], weighting: str = "none", snr_gamma: float = 5.0,
                        timestep_sampling: str = "uniform"):
    """The training forward process of a base, from its scheduler (or its config): flow matching for
    ``FlowMatch*`` schedulers and ``flow_prediction`` ones (SD3, Sana; timesteps follow a logit-normal density, so a VP
    ``timestep_sampling`` other than uniform is refused), else the variance-preserving DDPM process."""
    is_flow = False
    if hasattr(scheduler_config, "config"):  # a scheduler object: its class says it even if the config does not
        is_flow = type(scheduler_config).__name__.startswith("FlowMatch")
        scheduler_config = scheduler_config.config
    is_flow = is_flow or str(dict(scheduler_config).get("_class_name", "")).startswith("FlowMatch") \
        or dict(scheduler_config).get("prediction_type") == "flow_prediction"  # DPM-Solver for flow (Sana)
    if is_flow:
        if timestep_sampling != "uniform":
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is for variance-preserving bases; this "
                             f"flow-matching base draws timesteps from its logit-normal density (leave it 'uniform')")
        return FlowMatchingProcess(scheduler_config, weighting)
    return ForwardProcess(scheduler_config, weighting, snr_gamma, timestep_sampling)

"""Image quality: FID and KID in a judge's feature space, and Inception FID from local weights.

FID (Heusel et al. 2017, eq. 6): ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``.
KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over
random subsets.  Both come from torchmetrics, which accepts any ``nn.Module`` as feature
extractor; here it is the segmentation judge's pooled bottleneck (:class:`JudgeFeatures`),
which knows the embedded domain far better than an ImageNet Inception at 32x32.

Inception FID (the number papers report) runs only when the user supplies the weights file
(``pt_inception-2015-12-05-6726825d.pth`` from torch-fidelity); nothing is ever downloaded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from torchmetrics.image.kid import KernelInceptionDistance


class JudgeFeatures(nn.Module):
    """Feature extractor for torchmetrics: images ``(B, 3, H, W)`` (float [0, 1] or uint8) -> ``(B, D)``.

    ``judge`` is anything with ``features(images)``; ``num_features`` is read from it or
    probed once with a blank image.
    """

    def __init__(self, judge, num_features: int | None = None):
        super().__init__()
        if not callable(getattr(judge, "features", None)):
            raise ValueError(f"judge: {type(judge).__name__} has no features(images) method; FID/KID need one")
        self.judge = judge  # registered as a submodule when it is an nn.Module
        if num_features is None:
            num_features = getattr(judge, "num_features", None)
        if num_features is None:
            num_features = int(self._features(torch.zeros(1, 3, 32, 32)).shape[-1])
        self.num_features = int(num_features)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images).float().reshape(images.shape[0], -1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point():
            images = images.float() / 255.0
        return self._features(images)


class SeededKID(KernelInceptionDistance):
    """torchmetrics' KID with its random subsets drawn from a fixed seed, so results repeat exactly."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        with warnings.catch_warnings():  # "will save all extracted features": expected, features are small here
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            super().__init__(*args, **kwargs)
        self.seed = seed

    def compute(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return super().compute()


def judge_fid(judge) -> FrechetInceptionDistance:
    """FID in ``judge.features`` space; ``update(images in [0, 1], real=bool)`` then ``compute()``."""
    # sync_on_compute=False: one process holds the whole set (the alignment callback runs on rank 0 under DDP,
    # where torchmetrics' default all-gather would wait forever for the other ranks)
    return FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=True, sync_on_compute=False)


def judge_kid(judge, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> SeededKID:
    """KID in ``judge.features`` space; ``subset_size`` must not exceed either set's size."""
    return SeededKID(feature=JudgeFeatures(judge), subsets=subsets, subset_size=subset_size, normalize=True, seed=seed,
                     sync_on_compute=False)  # as judge_fid


def inception_fid(weights_path: str | Path) -> FrechetInceptionDistance:
    """Inception-v3 FID (2048-d pool features) from a local torch-fidelity weights file; never downloads."""
    path = Path(weights_path)
    if not path.is_file():
        raise ValueError(f"inception weights: '{path}' is not a file; pass the local path of torch-fidelity's "
                         f"pt_inception-2015-12-05-6726825d.pth (this project never downloads weights)")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise ImportError("Inception FID needs torch-fidelity: pip install torch-fidelity") from None
    try:  # refuse pickles that are more than tensors before torch-fidelity loads the file
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"inception weights: '{path}' is not a plain state dict of tensors ({e})") from None
    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets ``(N, D)`` (functional form; torchmetrics' own formula, ``_compute_fid``)."""
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    r, f = real.double(), fake.double()
    cov_r, cov_f = torch.cov(r.T).reshape(r.shape[1], -1), torch.cov(f.T).reshape(f.shape[1], -1)  # D = 1: (1, 1)
    return float(_compute_fid(r.mean(0), cov_r, f.mean(0), cov_f))

"""``FrozenBase``: loads every base layout offline and refuses, loudly, to be trained (docs/concepts.md#the-mcm).

Runs over the tiny Stable Diffusion, tiny pixel (shapes32 format) and tiny unconditional
bases from ``tiny_models``, and over the shipped ``shapes32`` base when it is installed.
"""
from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from mcm.models.frozen_base import BUILTIN_BASES, FrozenBase, FrozenBaseError
from tiny_models import TINY_PIXEL_MAX_LENGTH, TINY_PIXEL_SIZE, TINY_SD_MAX_LENGTH, TINY_SD_TEXT_HIDDEN

SHAPES32_SHIPPED = (BUILTIN_BASES["shapes32"] / "unet").is_dir()


@dataclass(frozen=True)
class Expected:
    fixture: str | None  # conftest fixture giving the directory; None = the built-in name
    downsample: int
    latent_channels: int
    prediction_type: str
    text: bool
    image_size: int  # pixels
    max_length: int | None = None
    text_hidden: int | None = None


KINDS = {
    "tiny_sd": Expected("tiny_sd_dir", 8, 4, "epsilon", True, 64, TINY_SD_MAX_LENGTH, TINY_SD_TEXT_HIDDEN),
    "tiny_pixel": Expected("tiny_pixel_base_dir", 1, 3, "v_prediction", True, TINY_PIXEL_SIZE, TINY_PIXEL_MAX_LENGTH, 32),
    "tiny_uncond": Expected("tiny_uncond_dir", 1, 3, "epsilon", False, TINY_PIXEL_SIZE),
    "shapes32": Expected(None, 1, 3, "v_prediction", True, 32),
}
PARAMS = [pytest.param(k, id=k) for k in ("tiny_sd", "tiny_pixel", "tiny_uncond")] + [pytest.param(
    "shapes32", id="shapes32", marks=pytest.mark.skipif(
        not SHAPES32_SHIPPED, reason=f"the shapes32 base is not shipped yet ({BUILTIN_BASES['shapes32']}/unet missing)"))]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE is also set in conftest)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _source(request, kind: str):
    spec = KINDS[kind]
    return request.getfixturevalue(spec.fixture) if spec.fixture else "shapes32"


@pytest.fixture(scope="module")
def _cache():
    return {}


@pytest.fixture
def base(request, _cache, no_network) -> FrozenBase:
    """A loaded base for ``kind`` (loaded once per module; tests that mutate load their own)."""
    kind = request.node.callspec.params["kind"]
    if kind not in _cache:
        _cache[kind] = FrozenBase.from_pretrained(_source(request, kind))
    return _cache[kind]


def _noise(base: FrozenBase, batch: int, seed: int = 0) -> torch.Tensor:
    size = base.unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, base.latent_channels, size, size, generator=g)  # (B, C, h, w)


# ---- facts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", PARAMS)
def test_facts(kind, base):
    spec = KINDS[kind]
    assert base.downsample == spec.downsample
    assert base.latent_channels == spec.latent_channels
    assert base.prediction_type == spec.prediction_type
    assert base.is_text_conditional is spec.text
    assert (base.vae is not None) is (spec.downsample > 1)
    assert base.num_train_timesteps == 1000 and base.alphas_cumprod.shape == (1000,)
    assert base.unet.config.sample_size * base.downsample == spec.image_size
    assert base.dtype == torch.float32 and base.device.type == "cpu"
    assert base.num_parameters() > 0


# ---- the three things adapters need ----------------------------------------------------------
@pytest.mark.parametrize("kind", PARAMS)
def test_image_round_trip(kind, base):
    spec, B = KINDS[kind], 2
    images = torch.rand(B, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    h = spec.image_size // spec.downsample
    latents = base.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert latents.shape == (B, spec.latent_channels, h, h) and latents.dtype == torch.float32
    again = base.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(latents, again), "encode_images must be deterministic for a fixed generator"
    decoded = base.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1 and torch.isfinite(decoded).all()
    if spec.downsample == 1:
        assert torch.equal(latents, images), "pixel bases: model space is image space"


@pytest.mark.parametrize("kind", PARAMS)
def test_encode_text(kind, base):
    spec = KINDS[kind]
    if not spec.text:
        assert base.encode_text(["a red circle"]) is None and base.encode_text(None, 2) is None
        return
    L, D = base.tokenizer.model_max_length, base.text_encoder.config.hidden_size
    if spec.max_length is not None:
        assert (L, D) == (spec.max_length, spec.text_hidden)
    cond = base.encode_text(["a red circle", "a blue square"])
    assert cond.shape == (2, L, D) and cond.dtype == torch.float32 and torch.isfinite(cond).all()
    assert base.encode_text([""]).shape == (1, L, D)
    uncond = base.encode_text(None, 2)
    assert uncond.shape == (2, L, D)
    assert torch.equal(uncond, base.encode_text(["", ""])), "None and '' are the same unconditional prompt"
    assert not torch.equal(cond, uncond)
    assert torch.equal(cond, base.encode_text(["a red circle", "a blue square"]))


@pytest.mark.parametrize("kind", PARAMS)
def test_predict_shape_dtype_and_determinism(kind, base):
    x = _noise(base, 2)
    t = torch.tensor([10, 900])
    emb = base.encode_text(["a red circle", ""])
    p = base.predict(x, t, emb)
    assert p.shape == x.shape and p.dtype == torch.float32 and torch.isfinite(p).all()
    assert torch.equal(p, base.predict(_noise(base, 2), t.clone(), emb)), "same inputs must give identical outputs"
    assert not torch.equal(p, base.predict(_noise(base, 2, seed=1), t, emb))
    p_scalar_t = base.predict(x, torch.tensor(10), emb)  # a 0-dim timestep broadcasts over the batch
    alone = base.predict(x[:1], t[:1], None if emb is None else emb[:1])  # batch composition: float noise only
    torch.testing.assert_close(p_scalar_t[:1], alone, rtol=1e-4, atol=1e-5)


# ---- refusing to train ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", PARAMS)
def test_refuses_training(kind, base):
    with pytest.raises(FrozenBaseError, match="frozen.*never be optimised"):
        base.parameters()
    with pytest.raises(FrozenBaseError):
        base.named_parameters()
    with pytest.raises(FrozenBaseError):
        torch.optim.SGD(base.parameters(), lr=0.1)
    with pytest.raises(FrozenBaseError):
        base.requires_grad_(True)
    base.requires_grad_(False)  # harmless
    assert base.train() is base
    assert not base.training and not any(m.training for m in base.modules())
    assert not any(p.requires_grad for p in base.frozen_parameters())


@pytest.mark.parametrize("kind", PARAMS)
def test_no_gradient_reaches_base(kind, base):
    x = _noise(base, 2).requires_grad_(True)
    emb = base.encode_text(["a red circle", "a blue square"])
    w = torch.ones_like(x, requires_grad=True)  # stands in for a trainable adapter
    p = base.predict(x, torch.tensor([5, 500]), emb)
    assert not p.requires_grad, "the base's prediction must not record a graph"
    loss = (p * w).sum()
    loss.backward()
    assert w.grad is not None and torch.equal(w.grad, p)
    assert x.grad is None
    assert all(q.grad is None for q in base.frozen_parameters())


# ---- identity in checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("kind", PARAMS)
def test_content_hash(kind, request, no_network):
    source = _source(request, kind)
    a, b = FrozenBase.from_pretrained(source), FrozenBase.from_pretrained(source)
    h = a.content_hash()
    assert len(h) == 64 and h == b.content_hash() == a.content_hash()
    changed = FrozenBase.from_pretrained(source)
    with torch.no_grad():
        next(changed.frozen_parameters()).view(-1)[0] += 1e-3
    assert changed.content_hash() != h


def test_torch_dtype_keeps_float32_outputs(tiny_pixel_base_dir, no_network):
    base = FrozenBase.from_pretrained(tiny_pixel_base_dir, torch_dtype=torch.bfloat16)
    assert base.dtype == torch.bfloat16 and base.text_encoder.dtype == torch.bfloat16
    x = _noise(base, 1)
    p = base.predict(x, torch.tensor([100]), base.encode_text(["a red circle"]))
    assert p.dtype == torch.float32 and p.shape == x.shape and torch.isfinite(p).all()


# ---- clear errors -------------------------------------------------------------------------------
def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_such_base"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        FrozenBase.from_pretrained(missing)


def test_directory_without_unet_names_the_path(tmp_path, tiny_uncond_dir):
    broken = tmp_path / "no_unet"
    shutil.copytree(tiny_uncond_dir, broken, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(broken)) + ".*unet/"):
        FrozenBase.from_pretrained(broken)


def test_text_encoder_without_tokenizer_is_reported(tmp_path, tiny_pixel_base_dir):
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_pixel_base_dir, broken, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(FileNotFoundError, match="text_encoder/ without tokenizer/"):
        FrozenBase.from_pretrained(broken)


@pytest.mark.skipif(SHAPES32_SHIPPED, reason="shapes32 is shipped in this install")
def test_builtin_not_shipped_is_reported():
    with pytest.raises(FileNotFoundError, match="shapes32.*not shipped"):
        FrozenBase.from_pretrained("shapes32")


def test_builtin_base_name_by_name_or_directory(tmp_path, tiny_pixel_base_dir, monkeypatch):
    """Shipped things of a built-in base (its judges) follow it when it is loaded from its directory; a copy
    elsewhere or another base is not it; the alignment callback and mcm evaluate pick judges by this name."""
    from mcm.evaluation.evaluate import load_judges
    from mcm.models.base_loading import builtin_base_name

    shipped = BUILTIN_BASES["shapes32"]
    assert builtin_base_name("shapes32") == "shapes32"
    assert builtin_base_name(str(shipped)) == "shapes32"
    assert builtin_base_name(shipped / ".." / "base") == "shapes32"
    monkeypatch.chdir(shipped.parent)
    assert builtin_base_name("base") == "shapes32"  # relative to the cwd
    assert builtin_base_name(tiny_pixel_base_dir) is None
    assert builtin_base_name(tmp_path / "missing") is None
    args = SimpleNamespace()
    judged = load_judges(args, 6, str(shipped))
    assert judged["segmentation"] is not None and judged["depth"] is not None
    other = load_judges(args, 6, str(tiny_pixel_base_dir))
    assert other["segmentation"] is None and other["depth"] is None and other["features"] is None

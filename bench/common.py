"""Shared pieces of the benchmarks: the two bench models, batches, the four steps, timing, memory.

The bench models (docs/concepts.md#the-mcm):

- ``shapes32``: the shipped pixel base if ``mcm/weights/shapes32/base`` exists, else a random
  base with the same architecture (``BasePretrainModule``'s defaults); MCM as in
  ``experiments/shapes32/*.yaml``; ControlNet without conditioning downsampling.
- ``sd15``: Stable Diffusion 1.5's architecture with random weights (UNet
  ``UNet2DConditionModel()`` = SD 1.5's config, its CLIP text encoder and x8 VAE); the paper's
  MCM (32 x (1, 1, 2, 4), 2 res blocks, attention at level 2); ControlNet with SD's x8
  conditioning embedding.

Steps work in model space: latents and caption embeddings are computed once per batch
(``MCMModule`` takes them as ``batch["latent"]`` / ``batch["text_emb"]``); their cost is the
same for every method and is reported separately.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python bench/x.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mcm.diffusion.forward_process import forward_process_for  # noqa: E402
from mcm.models.frozen_base import BUILTIN_BASES, FrozenBase  # noqa: E402

warnings.filterwarnings("ignore", message=".*self.log.*")  # MCMModule steps run without a Trainer

#: Stable Diffusion 1.5's scheduler_config.json (PNDM), without _class_name and version.
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon"}
CAPTIONS = ["a red circle and a blue square", "a green triangle", "a yellow ring and a purple cross", "a cyan ring"]


@dataclass
class BenchModel:
    """A frozen base plus what the adapters trained on it need."""

    name: str
    base: FrozenBase
    source: str  # where the base weights come from (shipped / random, which architecture)
    image_size: int  # pixels
    modalities: dict[str, dict]
    mcm_config: dict[str, Any]  # MCMModule's block_out_channels / layers_per_block / attention_levels
    cn_embedding: tuple[int, ...] | None  # ControlNet conditioning embedding widths (None: SD's x8 default)
    extra: dict = field(default_factory=dict)
    forward_process: Any = None  # the base's training forward process, built on first use


class HashTokenizer:
    """Stands in for the CLIP tokenizer of a random-weight text encoder: words -> stable ids, offline."""

    def __init__(self, vocab_size: int, model_max_length: int = 77):
        self.vocab_size, self.model_max_length = vocab_size, model_max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def __call__(self, prompts, padding=None, max_length=None, truncation=True, return_tensors="pt"):
        L = max_length or self.model_max_length
        ids = torch.full((len(prompts), L), self.eos, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = [zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in p.split()][: L - 2]
            ids[i, : len(words) + 2] = torch.tensor([self.bos, *words, self.eos])
        return SimpleNamespace(input_ids=ids)


# ---- the two bench models ------------------------------------------------------------------------
def build_shapes32(tiny: bool = False) -> BenchModel:
    from mcm.training.base_pretraining import BasePretrainModule

    mcm_cfg = {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "attention_levels": (1,)}
    if tiny:  # tests/tiny_models.py's tiny pixel base
        torch.manual_seed(0)
        base = BasePretrainModule(sample_size=16, block_out_channels=(16, 32), text_hidden=32, text_layers=1,
                                  preview_every_n_steps=0).ema_base()
        source, size = "random weights, tiny shapes32-format base (16x16)", 16
        mcm_cfg = {"block_out_channels": (16, 16), "layers_per_block": 1, "attention_levels": (1,)}
    elif (BUILTIN_BASES["shapes32"] / "unet").is_dir():
        base, source, size = FrozenBase.from_pretrained("shapes32"), "shipped shapes32 weights", 32
    else:
        torch.manual_seed(0)
        base = BasePretrainModule(preview_every_n_steps=0).ema_base()
        source, size = "random weights, shapes32 architecture (mcm/weights/shapes32/base not shipped yet)", 32
    base.source = "shapes32"
    return BenchModel("shapes32", base, source, size, {"segmentation": {"num_classes": 6}}, mcm_cfg, (16,))


def build_sd15(latent: int = 32, tiny: bool = False) -> BenchModel:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if tiny:  # tests/tiny_models.py's tiny SD
        unet = UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        text_cfg = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=77,
                                  bos_token_id=998, eos_token_id=999, pad_token_id=999)
        vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=4)
        mcm_cfg = {"block_out_channels": (16, 32), "layers_per_block": 1, "attention_levels": (1,)}
        source = "random weights, tiny SD-layout base"
    else:
        # diffusers' default config is SD 1.5's UNet except the cross-attention width (1280 there, 768 in SD 1.5)
        unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768)
        text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=32, sample_size=512)
        mcm_cfg = {"block_out_channels": (32, 32, 64, 128), "layers_per_block": 2, "attention_levels": (2,)}
        source = "random weights, Stable Diffusion 1.5 architecture (UNet, CLIP ViT-L text encoder, VAE)"
    text = CLIPTextModel(text_cfg)
    base = FrozenBase(unet, PNDMScheduler.from_config(SD15_SCHEDULER), vae, text,
                      HashTokenizer(text_cfg.vocab_size), source="sd15-random")
    return BenchModel("sd15", base, source, latent * 8, {"segmentation": {"num_classes": 6}}, mcm_cfg, None)


def build_model(name: str, args) -> BenchModel:
    """``shapes32`` or ``sd15`` with the options of the bench's command line, on ``args.device``."""
    m = build_shapes32(args.tiny) if name == "shapes32" else build_sd15(8 if args.tiny else args.sd_latent, args.tiny)
    m.base._apply(lambda t: t.to(args.device))
    if args.base_dtype != "float32":  # as MCMModule(base_dtype=...) does: all base weights in that dtype
        m.base._apply(lambda t: t.to(getattr(torch, args.base_dtype)) if t.is_floating_point() else t)
    if args.channels_last:
        m.base.unet.to(memory_format=torch.channels_last)
    return m


def batch_size_of(name: str, args) -> int:
    return args.shapes_batch if name == "shapes32" else args.sd_batch


def make_batch(m: BenchModel, batch_size: int, device) -> dict:
    """A training batch with cached ``latent`` and ``text_emb`` (what every method's step consumes)."""
    g = torch.Generator().manual_seed(0)
    S = m.image_size
    batch = {"image": torch.rand(batch_size, 3, S, S, generator=g) * 2 - 1,
             "segmentation": torch.randint(0, 6, (batch_size, S, S), generator=g),
             "depth": torch.rand(batch_size, 1, S, S, generator=g),
             "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]}
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["latent"] = m.base.encode_images(batch["image"])
    batch["text_emb"] = m.base.encode_text(batch["caption"])
    return batch


def build_plugins(m: BenchModel):
    import modalities as registry

    return registry.build_all(m.modalities)


def control_image(m: BenchModel, batch: dict) -> torch.Tensor:
    """ControlNet's input: the modality maps as channels at image resolution, concatenated (docs/concepts.md#baselines)."""
    plugins = build_plugins(m)
    return torch.cat([p.to_channels(batch[n]).float() for n, p in plugins.items()], dim=1)


# ---- adapters ----------------------------------------------------------------------------------
def build_mcm_module(m: BenchModel, **kwargs):
    """``MCMModule`` around the in-memory base (random SD weights are never written to disk)."""
    from mcm.training.mcm_module import MCMModule

    with mock.patch.object(FrozenBase, "from_pretrained", lambda *a, **k: m.base):
        module = MCMModule(base=m.name, modalities=m.modalities, **m.mcm_config, **kwargs)
    return module.to(m.base.device)


def build_controlnet(m: BenchModel, conditioning_channels: int):
    from diffusers import ControlNetModel

    kw = {} if m.cn_embedding is None else {"conditioning_embedding_out_channels": m.cn_embedding}
    cn = ControlNetModel.from_unet(m.base.unet, conditioning_channels=conditioning_channels, **kw)
    return cn.float().to(m.base.device)


def autocast_for(m: BenchModel):
    """Mixed precision for trainable fp32 modules next to a low-precision base (diffusers' train scripts)."""
    dt = m.base.unet.dtype
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(m.base.device.type, dtype=dt)


# ---- the steps ---------------------------------------------------------------------------------
def noisy(m: BenchModel, x0: torch.Tensor):
    """The base's training forward process (as ``MCMModule`` draws it): ``(x_t, t, target)``."""
    if m.forward_process is None:  # built once, not timed with every step
        m.forward_process = forward_process_for(m.base.scheduler)
    fp = m.forward_process
    noise = torch.randn_like(x0)
    t = fp.sample_timesteps(x0.shape[0], x0.device)
    return fp.add_noise(x0, noise, t), t, fp.target(x0, noise, t)


def base_forward(m: BenchModel, batch: dict) -> torch.Tensor:
    x_t, t, _ = noisy(m, batch["latent"])
    return m.base.predict(x_t, t, batch["text_emb"])


def cached_prediction_batch(m: BenchModel, batch: dict, k: int) -> dict:
    """``batch`` plus its cached base predictions for ``k`` draws per sample, as a ``mcm data encode
    --predictions k`` shard gives them (float16 on disk, read back as float32)."""
    from mcm.training.prediction_cache import prediction_batch, prediction_members

    keys = [f"bench{i:05d}" for i in range(batch["latent"].shape[0])]
    members = prediction_members(m.base, batch["latent"], batch["text_emb"], keys, k)
    return {**batch, **{n: v.to(batch["latent"].device) for n, v in prediction_batch(members).items()}}


def mcm_step(module, opt, batch: dict, read_loss: bool = True) -> float | torch.Tensor:
    """One MCM training step: MCMModule's own step (base under no_grad), backward, AdamW.  ``read_loss=False``
    returns the loss tensor unread (reading it is a host synchronisation, as Lightning's loop avoids)."""
    loss = module._common_step(batch, "train")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()) if read_loss else loss.detach()


def in_a_fit(module, value_check_batches: int | None = None):
    """``module`` as inside ``Trainer.fit`` (its step checks batch values only on the first
    ``value_check_batches`` batches; a huge number: every step, as before the step became sync-free)."""
    module._trainer = mock.MagicMock()
    if value_check_batches is not None:
        module.value_check_batches = value_check_batches
    return module


def unet_loss(m: BenchModel, unet, batch: dict, controlnet=None, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion MSE of ``unet`` (optionally with ControlNet residuals into its skip connections)."""
    x_t, t, target = noisy(m, batch["latent"])
    dt = next(unet.parameters()).dtype
    with autocast_for(m):
        extra = {}
        if controlnet is not None:
            down, mid = controlnet(x_t, t, encoder_hidden_states=batch["text_emb"].float(), controlnet_cond=cond,
                                   return_dict=False)
            extra = {"down_block_additional_residuals": [r.to(dt) for r in down],
                     "mid_block_additional_residual": mid.to(dt)}
        pred = unet(x_t.to(dt), t, encoder_hidden_states=batch["text_emb"].to(dt), **extra).sample
    return F.mse_loss(pred.float()[:, : x_t.shape[1]], target)


def trainable_step(loss_fn: Callable[[], torch.Tensor], opt) -> float:
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- timing and memory -------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device="cpu",
                order: list[str] | None = None) -> dict[str, dict]:
    """Run the round ``A B C`` (or ``order``, names may repeat: ``A B C A B``) ``reps`` times after
    ``warmup`` rounds; median and min seconds per name over all its runs.

    Interleaving spreads background noise (other processes, thermal, allocator) over all entries.
    """
    order = order or list(fns)
    for _ in range(warmup):
        for k in order:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "reps": len(v)} for k, v in times.items()}


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _mallopt(param: int, value: int) -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):  # not glibc: RSS may then keep freed memory (peaks stay upper bounds)
        pass


class PeakMemory:
    """Peak memory of a workload: CUDA ``max_memory_allocated``, or on CPU the process's peak RSS.

    CPU: the peak RSS (``VmHWM``) is reset through ``/proc/self/clear_refs`` before each
    workload; values are bytes above the RSS measured at construction (interpreter + imported
    libraries, before any model), so they include weights, activations, gradients and
    optimizer state.  While measuring, glibc's mmap threshold is 64 KB so freed tensors go back
    to the OS between workloads; ``release()`` restores fast allocation for timing.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.floor = 0 if self.cuda else _proc_status("VmRSS")
        if not self.cuda:
            _mallopt(M_MMAP_THRESHOLD, 64 * 1024)  # every tensor >= 64 KB is its own mapping, unmapped on free

    def release(self) -> None:
        """Back to fast allocation (32 MB mmap threshold, as glibc's dynamic default reaches) for timing:
        the strict setting makes steps up to 2.5x slower."""
        if not self.cuda:
            _mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
            _mallopt(M_TRIM_THRESHOLD, 64 * 2**20)

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _proc_status("VmRSS") - self.floor

    def measure(self, fn: Callable[[], Any], repeat: int = 2) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        for _ in range(repeat):
            fn()
        sync("cuda" if self.cuda else "cpu")
        return torch.cuda.max_memory_allocated() if self.cuda else _proc_status("VmHWM") - self.floor


def add_common_args(p) -> None:
    p.add_argument("--models", default="shapes32,sd15", help="comma-separated: shapes32, sd15")
    p.add_argument("--sd-latent", type=int, default=32, help="SD latent side (image side = 8x); 64 = 512 px")
    p.add_argument("--sd-batch", type=int, default=1)
    p.add_argument("--shapes-batch", type=int, default=32)
    p.add_argument("--base-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="frozen base weights' dtype; trainable modules stay fp32 (autocast for ControlNet)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for all UNets")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (slow warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (< 3 min on the 2-core CPU box)")
    p.add_argument("--tiny", action="store_true", help="tiny models: checks that the script runs (tests)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per entry (default 7, quick 3)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def reps_of(args) -> tuple[int, int]:
    """(repetitions, warm-up rounds)."""
    if args.reps:
        return args.reps, 1
    return (2, 1) if args.tiny else (3, 1) if args.quick else (7, 2)


def maybe_compile(module, args):
    if args.compile:
        module.compile()
    return module

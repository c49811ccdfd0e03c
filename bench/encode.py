"""Throughput of ``mcm data encode`` (images/s) with 0, 1 and 2 workers, and the bytes it adds per sample.

The base is written to a temporary directory and loaded back as a user's would be:

- ``--arch tiny`` (default): ``tests/tiny_models.py``'s tiny SD (64x64 images, x8 VAE, CLIP width 32);
- ``--arch sd15``: Stable Diffusion 1.5's VAE and CLIP ViT-L text encoder with random weights (the two
  models encoding runs; the UNet, which encoding never calls, is a tiny one to keep the directory small).

Wall time of ``encode_shards`` per setting, base loading and worker start-up included (what a user waits).

    python bench/encode.py                       # tiny, 64 samples in 4 shards
    python bench/encode.py --arch sd15 --image-size 256 --samples 16 --json bench_encode.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):  # scripts run as `python bench/x.py`; the tiny models live with the tests
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_base(arch: str, path: Path) -> Path:
    from tiny_models import make_tiny_sd, tiny_clip_tokenizer

    make_tiny_sd(path)
    if arch == "sd15":  # swap in SD 1.5's VAE and text encoder architectures (random weights)
        import shutil

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        tok = tiny_clip_tokenizer()
        AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      norm_num_groups=32, sample_size=512).save_pretrained(path / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(path / "text_encoder")
        shutil.rmtree(path / "unet")  # a tiny UNet reading 768-wide text (never run by encoding)
        UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                             attention_head_dim=8, norm_num_groups=8).save_pretrained(path / "unet")
    return path


def make_shards(folder: Path, samples: int, shards: int, size: int) -> list[str]:
    from shard_fixtures import sample_members, write_tar

    rng, out = np.random.default_rng(0), []
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-samples // shards)
    for s in range(shards):
        members = []
        for i in range(s * per, min(samples, (s + 1) * per)):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            members += sample_members(f"s{i:06d}", img, caption="a red circle and a blue square")
        out.append(str(write_tar(folder / f"train-{s:04d}.tar", members)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--image-size", type=int, default=None, help="default 64 (tiny) / 256 (sd15)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from mcm.training.encode import encode_shards

    size = args.image_size or (64 if args.arch == "tiny" else 256)
    res: dict = {"arch": args.arch, "image_size": size, "samples": args.samples, "threads": torch.get_num_threads(),
                 "images_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = make_base(args.arch, tmp / "base")
        raw = make_shards(tmp / "raw", args.samples, args.shards, size)
        for w in [int(x) for x in args.workers.split(",")]:
            t0 = time.perf_counter()
            report = encode_shards(str(base), raw, tmp / f"out{w}", batch_size=args.batch_size, workers=w)
            res["images_per_s"][str(w)] = report.samples / (time.perf_counter() - t0)
        out = tmp / f"out{args.workers.split(',')[0]}"
        added = sum((out / Path(r).name).stat().st_size - Path(r).stat().st_size for r in raw)
        res["cached_bytes_per_sample"] = added / args.samples  # tar headers + .npy headers included
        import tarfile

        with tarfile.open(out / Path(raw[0]).name) as tf:
            res["member_bytes"] = {m.name.split(".", 1)[1]: m.size for m in tf if m.name.startswith("s000000.")}
    for w, v in res["images_per_s"].items():
        print(f"workers={w}: {v:8.2f} images/s")
    print(f"added per sample: {res['cached_bytes_per_sample']:.0f} bytes; members: {res['member_bytes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()

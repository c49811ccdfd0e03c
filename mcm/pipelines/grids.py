"""Sample grids as images: one ``(3, H', W')`` picture of many samples (training, evaluation, CLI)."""
from __future__ import annotations

import torch
from torchvision.utils import make_grid


def grid_image(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """``(B,3,H,W)`` in [0, 1] -> one ``(3, H', W')`` grid."""
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=pad, pad_value=1.0)


@torch.no_grad()
def comparison_grid(base, adapter, batch: dict, n: int = 8, steps: int = 25, guidance_scale: float = 1.0,
                    seed: int = 0, strength: float | None = None) -> torch.Tensor:
    """Rows: each condition's visualisation, then the base alone, then base + adapter (same seeds) at ``strength``
    (``None``: the adapter's ``default_strength``)."""
    from mcm.diffusion.control import Control, controlled_sample
    from mcm.diffusion.sampling import generators_for

    n = min(n, batch["image"].shape[0])
    conds = {k: batch[k][:n].to(base.device) for k in adapter.modality_names if k in batch}
    prompts = list(batch["caption"][:n]) if base.is_text_conditional and "caption" in batch else None
    labels = batch["class_label"][:n] if base.is_class_conditional and "class_label" in batch else None
    seeds = [seed + i for i in range(n)]
    was_training = adapter.training
    adapter.eval()

    def run(controls):
        x0 = controlled_sample(base, controls, n, None, prompts, None, labels, steps, guidance_scale,
                               generator=generators_for(seeds, None))
        return (base.decode(x0) + 1) / 2

    plain, ctrl = run([]), run([Control(adapter, conds, 1.0, strength)])
    adapter.train(was_training)
    rows = [adapter.plugins[k].visualize(v).cpu() for k, v in conds.items()]
    size = plain.shape[-2:]
    rows = [torch.nn.functional.interpolate(r, size=size, mode="nearest") for r in rows]
    return torch.cat(rows + [plain.cpu(), ctrl.cpu()])

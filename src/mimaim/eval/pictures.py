"""Pictures people would rather look at than read: reconstruction grids, curves, bar charts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..data import build_source, denormalize, eval_transform


def save_image_grid(columns: dict[str, torch.Tensor], path: str | Path, max_rows: int = 8,
                    title: str | None = None) -> Path:
    """One row per image, one titled column per entry of ``columns`` ((B, 3, H, W), normalised)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    rows = min(max_rows, next(iter(columns.values())).shape[0])
    fig, axes = plt.subplots(rows, len(names), figsize=(1.9 * len(names), 1.9 * rows + 0.4), squeeze=False)
    for c, name in enumerate(names):
        imgs = denormalize(columns[name][:rows].detach().float().cpu())
        axes[0][c].set_title(name, fontsize=9)
        for r in range(rows):
            axes[r][c].imshow(imgs[r].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[r][c].set(xticks=[], yticks=[])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_images(paths: list[str], img_size: int) -> torch.Tensor:
    from PIL import Image

    transform = eval_transform(img_size)
    out = []
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"image {p!r} does not exist")
        with Image.open(p) as img:
            out.append(transform(img.convert("RGB")))
    return torch.stack(out)


def held_out_images(cfg, count: int = 8) -> torch.Tensor:
    """The first ``count`` held-out images of a run's data, one per class where possible; training images
    (with a note) when the data is too small to hold any out."""
    data = build_source(cfg.data, cache="off", progress=False)
    source = data.split("val", cfg.val_fraction)
    if len(source) == 0:
        print(f"note: {cfg.data} holds no images out (val_fraction {cfg.val_fraction:g} of each class is under "
              "one image): the picture shows training images", file=sys.stderr)
        source = data.split("train", cfg.val_fraction)
    transform = eval_transform(cfg.img_size)
    picked, seen_labels = [], set()
    for i in range(len(source)):
        if source.labels[i] not in seen_labels or len(seen_labels) >= count:
            seen_labels.add(source.labels[i])
            try:
                picked.append(transform(source.load(i)))
            except Exception:  # noqa: BLE001 - a broken file just isn't drawn
                continue
        if len(picked) >= count:
            break
    if not picked:
        raise ValueError(f"{cfg.data}: no readable image to draw; pass some with --images")
    return torch.stack(picked)


@torch.no_grad()
def reconstruction_figure(objective, cfg, path: str | Path, images: torch.Tensor | None = None,
                          device: str | torch.device = "cpu", seed: int = 0) -> Path:
    """Draw ``objective.reconstruct`` for some images (held-out ones by default)."""
    if images is None:
        images = held_out_images(cfg)
    was_training = objective.training
    objective.eval()
    generator = torch.Generator().manual_seed(seed)
    masking = objective.draw_masking(images.shape[0], generator)
    images = images.to(device)
    masking = masking.to(device) if masking is not None else None
    columns = objective.reconstruct(images, masking)
    objective.train(was_training)
    title = f"{cfg.objective} · {cfg.model}/{cfg.patch_size} · {Path(cfg.out).name}"
    return save_image_grid(columns, path, title=title)

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_image_folder(root: Path, classes=("a", "b"), per_class: int = 6, size: int = 16, seed: int = 0) -> Path:
    """A tiny labelled image folder of random-ish PNG/JPEG images: root/<class>/<n>.png."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.full((size, size, 3), 40 + 150 * c, dtype=np.uint8)
            noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img = Image.fromarray(base + noise)
            img.save(d / (f"{i}.png" if i % 2 else f"{i}.jpg"))
    return root


def finished_run_rows(run_dir: Path, steps: int) -> list[dict]:
    """metrics.csv and summary.json of a run that finished ``steps`` optimiser steps -> metrics.csv's rows.

    Rows in step order up to ``steps``, every loss finite and positive; the summary counts the
    same steps and reports the last row's loss."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == sorted({int(r["step"]) for r in rows}) and int(rows[-1]["step"]) == steps
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows), rows
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert summary["steps"] == steps and summary["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-4)
    return rows


def check_picture(path: Path, columns: int, rows: int) -> None:
    """A reconstruction picture: one 1.9-inch cell at 110 dpi (209 px) per column and image row, plus the
    title's 0.4 inch (eval/pictures.py ``save_image_grid``), and not a blank page."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape == (209 * rows + 44, 209 * columns), pixels.shape
    assert pixels.std() > 10


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tiny models: no thread hand-offs on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")

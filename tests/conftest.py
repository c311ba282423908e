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

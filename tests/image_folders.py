"""Real Fashion-MNIST images written as image files in class folders, as a user would have them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_fashion_folder(
    root: Path,
    classes: tuple[int, ...],
    *,
    per_class: int,
    suffix: str = ".png",
    split: str = "test",
    offset: int = 0,
) -> Path:
    """Write ``per_class`` Fashion-MNIST images of each class as ``root/<class name>/<n><suffix>``.

    Args:
        root: the folder to create (it may exist).
        classes: Fashion-MNIST class ids; each becomes a subfolder named after the class.
        per_class: images per class (the first ones of the split, after ``offset``).
        suffix: ``.png`` or ``.jpg`` (JPEG is lossy, so its pixels differ slightly).
        split: the dataset split the images come from.
        offset: images of each class to skip first (for disjoint folders).

    Returns:
        ``root``.
    """
    from PIL import Image

    from supsup_deploy.data import DEBIAN_FASHION_MNIST, load_dataset

    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    dataset = load_dataset("fashion-mnist", split=split)
    labels = dataset.labels.numpy()
    for class_id in classes:
        name = dataset.spec.class_names[class_id].replace("/", "-").replace(" ", "_")
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(labels == class_id)[offset : offset + per_class]
        for number, row in enumerate(rows):
            pixels = dataset.images[int(row), 0].numpy()
            Image.fromarray(pixels, "L").save(folder / f"{number:04d}{suffix}", quality=95)
    return root

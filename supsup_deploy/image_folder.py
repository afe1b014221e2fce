"""A folder of class subfolders (torchvision's ``ImageFolder`` layout) as train/val/test splits,
streamed from disk one image at a time.

Two layouts are read:

- "folders": ``ROOT/train/<class>/...`` and optionally ``ROOT/val/<class>/...`` and
  ``ROOT/test/<class>/...``; a split without its folder is carved from train;
- "carved": ``ROOT/<class>/...``; val and test are both carved from it.

A root holding a ``train`` subfolder is read as "folders". Classes are the sorted names of the
class subfolders of the training folder; labels are their positions. Each class folder is listed
recursively (symbolic links followed, as torchvision does), its files sorted by relative path.
Hidden files and folders (names starting with ".") are skipped, as are files whose suffix is
not one of :data:`~supsup_deploy.images.IMAGE_SUFFIXES` and files lying outside a class folder;
they are listed in :attr:`ImageFolderData.ignored` (a hidden folder as one entry, unread).

Carving is stratified: of a class's ``n`` training images, ``round(test_fraction * n)`` go to
test, then ``round(val_fraction * n)`` of the rest go to val. The test images are the first of
``default_rng([seed, label, 0]).permutation(n)``, the val images the first of
``default_rng([seed, label, 1]).permutation(m)`` over the ``m`` images left, so each choice
depends only on the seed, the class's label and its sorted file list. Every split keeps class
order, then file order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from supsup_deploy.data import (
    FOLDER_DATASET,
    DatasetSpec,
    TaskSpec,
    TaskSplits,
    preprocess_images,
)
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.images import IMAGE_SUFFIXES, open_image, read_pixels

SPLIT_NAMES = ("train", "val", "test")
GREY_MODES = frozenset({"1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
"""Pillow modes read as 1 channel; a folder with an image of any other mode is read as RGB."""
DEFAULT_IMAGE_SIZE = 32
"""The side images are resized to when they are not all square and of one size."""
WORKER_THRESHOLD = 256
"""Splits with more images than this are decoded in worker processes by default."""
MIN_WORKER_CPUS = 4
"""Fewer cores than this decode in the training process by default (:func:`default_num_workers`)."""
MIN_STD = 1e-3
"""The smallest standard deviation :func:`compute_mean_std` returns (constant images)."""
_STATISTICS_BATCH = 256


@dataclass(frozen=True)
class FolderSample:
    """One image file and its class label."""

    path: Path
    label: int


@dataclass(frozen=True)
class ImageFolderData:
    """A scanned image folder: its classes, its three splits and what the images look like.

    Attributes:
        root: the folder scanned.
        class_names: the class subfolders' names, sorted; label i is ``class_names[i]``.
        splits: "train", "val" and "test" samples, each in class order, then file order.
        layout: "folders" (``train/``, ``val/``, ``test/`` subfolders) or "carved".
        ignored: files (and hidden folders) found but not used, sorted.
        channels: 1 when every image's mode is greyscale (:data:`GREY_MODES`), else 3.
        image_size: the images' side when all are square and of one size, else
            :data:`DEFAULT_IMAGE_SIZE`.
        seed: the seed carving used.
        val_fraction: the share of each class carved for val (when there is no ``val/``).
        test_fraction: the share of each class carved for test (when there is no ``test/``).
    """

    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, tuple[FolderSample, ...]]
    layout: str
    ignored: tuple[Path, ...]
    channels: int
    image_size: int
    seed: int
    val_fraction: float
    test_fraction: float

    def task_splits(
        self,
        task: TaskSpec,
        *,
        channels: int,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        seed: int = 0,
        num_workers: int | None = None,
    ) -> TaskSplits:
        """One task's splits: the samples of its classes, relabelled ``0..k-1`` in the task's
        class order, streamed as the given input spec.

        The caps draw as :func:`supsup_deploy.data.task_splits` does: a training subset from
        ``default_rng([seed, task.index, 0])``, a test subset from
        ``default_rng([seed, task.index, 1])``, each kept in split order. The training images
        are then put in the order of ``default_rng([seed, task.index, 2]).permutation``, so that
        what reads them in order (the refresh of normalisation statistics) sees the classes
        mixed, as in a dataset's own order, not one class after another.

        Args:
            task: the task; its classes are labels of this folder.
            channels: 1 or 3, the model's input channels.
            size: the model's input side.
            mean: per-channel mean of pixels / 255 to normalise with.
            std: per-channel standard deviation of pixels / 255.
            max_train_samples: cap on training images, or None.
            max_test_samples: cap on test images, or None.
            seed: seed of the caps.
            num_workers: decoding worker processes; None for :func:`default_num_workers`.

        Returns:
            The task's training, validation and test splits.
        """
        lookup = {original: label for label, original in enumerate(task.classes)}
        chosen = {
            split: [
                FolderSample(sample.path, lookup[sample.label])
                for sample in samples
                if sample.label in lookup
            ]
            for split, samples in self.splits.items()
        }
        for split, cap, stream in (("train", max_train_samples, 0), ("test", max_test_samples, 1)):
            samples = chosen[split]
            if cap is not None and len(samples) > cap:
                rng = np.random.default_rng([seed, task.index, stream])
                chosen[split] = [
                    samples[row] for row in sorted(rng.choice(len(samples), cap, replace=False))
                ]
        mixed = np.random.default_rng([seed, task.index, 2]).permutation(len(chosen["train"]))
        chosen["train"] = [chosen["train"][row] for row in mixed]
        settings = {
            "channels": channels,
            "size": size,
            "mean": mean,
            "std": std,
            "num_workers": num_workers,
        }
        return TaskSplits(
            train=ImageFolderSplit(chosen["train"], **settings),
            val=ImageFolderSplit(chosen["val"], **settings),
            test=ImageFolderSplit(chosen["test"], **settings),
            task=task,
        )

    def record(self) -> dict:
        """A JSON-serialisable record of the scan, with a hash that pins the exact split.

        ``sha256`` is the SHA-256 of ``json.dumps(entries, separators=(",", ":"))`` (ASCII)
        where ``entries`` is the sorted list of ``[split, relative path, label]``, the path
        relative to the root with "/" separators.

        Returns:
            Layout, class names, per-split per-class counts, seed, fractions, channels, image
            size, the number of ignored paths and ``sha256``.
        """
        counts = {split: dict.fromkeys(self.class_names, 0) for split in SPLIT_NAMES}
        entries = []
        for split, samples in self.splits.items():
            for sample in samples:
                counts[split][self.class_names[sample.label]] += 1
                entries.append([split, sample.path.relative_to(self.root).as_posix(), sample.label])
        listing = json.dumps(sorted(entries), separators=(",", ":"))
        return {
            "layout": self.layout,
            "class_names": list(self.class_names),
            "counts": counts,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "channels": self.channels,
            "image_size": self.image_size,
            "ignored": len(self.ignored),
            "sha256": hashlib.sha256(listing.encode("ascii")).hexdigest(),
        }


def _raise_unreadable(error: OSError) -> NoReturn:
    raise FormatError(f"{error.filename}: cannot read folder ({error.strerror})")


def _list_folder(folder: Path, ignored: list[Path]) -> tuple[list[Path], list[Path]]:
    """The non-hidden subfolders and the files directly in ``folder``, sorted; hidden entries
    go to ``ignored``."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        _raise_unreadable(error)
    ignored += [entry for entry in entries if entry.name.startswith(".")]
    visible = [entry for entry in entries if not entry.name.startswith(".")]
    return [entry for entry in visible if entry.is_dir()], [e for e in visible if not e.is_dir()]


def _class_images(folder: Path, ignored: list[Path]) -> list[Path]:
    """Image files below a class folder, sorted by relative path; skipped files to ``ignored``."""
    images = []
    for current, folders, files in os.walk(folder, onerror=_raise_unreadable, followlinks=True):
        here = Path(current)
        ignored += [here / name for name in folders + files if name.startswith(".")]
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            path = here / name
            if name.startswith("."):
                continue
            (images if path.suffix.lower() in IMAGE_SUFFIXES else ignored).append(path)
    images.sort(key=lambda path: path.relative_to(folder).as_posix())
    if not images:
        raise ConfigError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this class folder")
    return images


def _split_classes(folder: Path, ignored: list[Path]) -> dict[str, list[Path]]:
    """Class name to sorted image files, for one split folder of class subfolders."""
    class_folders, loose_files = _list_folder(folder, ignored)
    ignored += loose_files
    if not class_folders:
        raise ConfigError(
            f"{folder}: no class subfolders with images; expected {folder}/<class>/<images>"
        )
    return {sub.name: _class_images(sub, ignored) for sub in class_folders}


def _carve(
    images: list[Path], label: int, carved: dict[str, float], seed: int
) -> tuple[list[Path], dict[str, list[Path]]]:
    """Splits one class's sorted training images: what stays for training, and per carved split
    ("test" then "val", as in the module docstring) what it takes."""
    rest, taken = images, {}
    for stream, split in enumerate(("test", "val")):
        if split not in carved:
            continue
        count = round(carved[split] * len(images))
        order = np.random.default_rng([seed, label, stream]).permutation(len(rest))
        taken[split] = [rest[row] for row in sorted(order[:count])]
        rest = [rest[row] for row in sorted(order[count:])]
    return rest, taken


def scan_image_folder(
    root: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_classes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImageFolderData:
    """Lists an image folder, opens every image's header once and splits it (module docstring).

    Headers are read, not pixels: non-images and decompression bombs are refused here, while
    a truncated image is only found when it is decoded (:class:`ImageFolderSplit`).

    Args:
        root: the folder, in the "folders" or the "carved" layout.
        val_fraction: share of each class carved from train for val when there is no ``val/``.
        test_fraction: share of each class carved from train for test when there is no
            ``test/``; the two fractions sum to less than 1.
        seed: non-negative seed of the carving.
        max_classes: the most classes allowed, or None.
        progress: called with the number of image headers checked so far, after each one.

    Returns:
        The folder's classes, splits, ignored files, channels and image size.

    Raises:
        ConfigError: an argument is out of range; the root is missing or not a folder; a split
            folder has no class subfolders; a class folder has no images; there are fewer than
            2 or more than ``max_classes`` classes; val/ or test/ holds a class train/ lacks; or
            carving leaves a class no training image. The one-line message names the path.
        FormatError: a folder cannot be listed, or an image file cannot be read, is not an
            image or is a decompression bomb; the one-line message names it.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    if max_classes is not None and max_classes < 2:
        raise ConfigError(f"max_classes must be at least 2 or None, got {max_classes}")
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root}: no such folder")
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder")

    ignored: list[Path] = []
    if (root / "train").is_dir():
        layout = "folders"
        subfolders, loose_files = _list_folder(root, ignored)
        ignored += loose_files
        for sub in subfolders:
            if sub.name not in SPLIT_NAMES:
                raise ConfigError(
                    f"{sub}: unexpected folder beside train/; a root with train/ holds only "
                    "train/, val/ and test/, each of class subfolders"
                )
        split_folders = {split: root / split for split in SPLIT_NAMES if (root / split).is_dir()}
    else:
        layout = "carved"
        split_folders = {"train": root}
    found = {split: _split_classes(folder, ignored) for split, folder in split_folders.items()}

    train_folder = split_folders["train"]
    class_names = tuple(sorted(found["train"]))
    if len(class_names) < 2:
        raise ConfigError(
            f"{train_folder}: 1 class folder ({class_names[0]}); needs at least 2 classes"
        )
    if max_classes is not None and len(class_names) > max_classes:
        raise ConfigError(
            f"{train_folder}: more classes ({len(class_names)}) than allowed ({max_classes})"
        )
    for split in ("val", "test"):
        for name in found.get(split, {}):
            if name not in found["train"]:
                raise ConfigError(
                    f"{split_folders[split] / name}: class {name!r} has no folder in {train_folder}"
                )

    channels, image_size = _inspect_headers(
        [path for classes in found.values() for images in classes.values() for path in images],
        progress,
    )

    fractions = {"val": val_fraction, "test": test_fraction}
    carved = {split: fractions[split] for split in ("val", "test") if split not in split_folders}
    splits: dict[str, list[FolderSample]] = {split: [] for split in SPLIT_NAMES}
    for label, name in enumerate(class_names):
        images = found["train"][name]
        kept, taken = _carve(images, label, carved, seed)
        if not kept:
            raise ConfigError(
                f"{train_folder / name}: its {len(images)} images all go to val and test; add "
                "images or lower the val and test fractions"
            )
        taken["train"] = kept
        for split in ("val", "test"):
            if split in split_folders:
                taken[split] = found[split].get(name, [])
        for split in SPLIT_NAMES:
            splits[split] += [FolderSample(path, label) for path in taken[split]]

    return ImageFolderData(
        root=root,
        class_names=class_names,
        splits={split: tuple(samples) for split, samples in splits.items()},
        layout=layout,
        ignored=tuple(sorted(ignored)),
        channels=channels,
        image_size=image_size,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def _inspect_headers(paths: list[Path], progress: Callable[[int], None] | None) -> tuple[int, int]:
    """Opens every image's header; returns the channels and image size the images call for."""
    modes, sizes = set(), set()
    for checked, path in enumerate(paths, start=1):
        with open_image(path) as image:
            modes.add(image.mode)
            sizes.add(image.size)
        if progress is not None:
            progress(checked)
    channels = 1 if modes <= GREY_MODES else 3
    (width, height), *others = sizes
    image_size = width if not others and width == height else DEFAULT_IMAGE_SIZE
    return channels, image_size


def default_num_workers(count: int) -> int:
    """Worker processes used to decode ``count`` images when none is asked for.

    Args:
        count: the images to decode.

    Returns:
        ``min(4, os.cpu_count() // 2)`` when ``count`` exceeds :data:`WORKER_THRESHOLD` and the
        machine has at least :data:`MIN_WORKER_CPUS` cores, else 0: decode in the calling
        process. Starting workers costs more than a few images, and with fewer cores they take
        them from training (on 2 cores, ``python -m bench.learn``: 246 images per second with 2
        workers, 268 with 1, 322 with none, as many as from memory).
    """
    cpus = os.cpu_count() or 1
    return min(4, cpus // 2) if count > WORKER_THRESHOLD and cpus >= MIN_WORKER_CPUS else 0


class _DecodedImages(TorchDataset):
    """Decodes one sample per item to uint8 pixels. A file that fails gives zero pixels and its
    one-line error message (empty for a good file), so that the main process raises it."""

    def __init__(self, samples: Sequence[FolderSample], channels: int, size: int) -> None:
        self.samples = samples
        self.channels = channels
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        sample = self.samples[index]
        try:
            pixels = read_pixels(sample.path, channels=self.channels, size=self.size)
        except FormatError as error:
            blank = torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8)
            return blank, sample.label, str(error)
        return pixels, sample.label, ""


def _pixel_batches(
    samples: Sequence[FolderSample],
    rows: Sequence[int],
    *,
    batch_size: int,
    channels: int,
    size: int,
    num_workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decodes ``samples[rows]`` in batches of ``batch_size``, in order: uint8 pixels and int64
    labels; raises the first failed file's FormatError here, in the calling process."""
    batches = [list(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
    loader = DataLoader(
        _DecodedImages(samples, channels, size), batch_sampler=batches, num_workers=num_workers
    )
    for pixels, labels, failures in loader:
        failure = next((message for message in failures if message), None)
        if failure is not None:
            raise FormatError(failure)
        yield pixels, labels


class ImageFolderSplit:
    """One split of an image folder, decoded from disk batch by batch (never all in memory).

    Args:
        samples: the split's images and labels.
        channels: 1 or 3.
        size: the side images are resized and centre-cropped to.
        mean: per-channel mean of pixels / 255.
        std: per-channel standard deviation of pixels / 255 (positive).
        num_workers: decoding worker processes; None for :func:`default_num_workers`.

    Raises:
        ConfigError: an argument is out of range or mean/std do not have one value per channel.
    """

    def __init__(
        self,
        samples: Sequence[FolderSample],
        *,
        channels: int,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_workers: int | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        if size < 1:
            raise ConfigError(f"size must be at least 1, got {size}")
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ConfigError(
                f"mean and std need {channels} values each, std positive; got mean {list(mean)} "
                f"and std {list(std)}"
            )
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers must be non-negative, got {num_workers}")
        self.samples = tuple(samples)
        self.channels = channels
        self.size = size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.num_workers = (
            default_num_workers(len(self.samples)) if num_workers is None else num_workers
        )

    def __len__(self) -> int:
        return len(self.samples)

    def batches(
        self, *, batch_size: int, shuffle: bool, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields every sample once, in batches, as :func:`supsup_deploy.data.iterate_batches`.

        The order is ``torch.randperm(len(self), generator=generator)`` when shuffling (drawn as
        ``iterate_batches`` draws it, so one generator state gives one order on both paths),
        else file order; the last batch may be smaller. Batches do not depend on the number of
        workers.

        Args:
            batch_size: samples per batch (at least 1).
            shuffle: visit samples in random order.
            generator: source of the order's randomness; None uses torch's global RNG.

        Returns:
            An iterator of (float32 ``(pixel / 255 - mean) / std`` images ``[n, C, size, size]``,
            int64 labels ``[n]``) on the CPU.

        Raises:
            ConfigError: ``batch_size`` is below 1.
            FormatError: an image is unreadable, truncated or corrupt (raised when its batch is
                reached; the one-line message names the file).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        count = len(self.samples)
        if shuffle:
            random_device = generator.device if generator is not None else torch.device("cpu")
            rows = torch.randperm(count, generator=generator, device=random_device).tolist()
        else:
            rows = list(range(count))
        return self._normalised(rows, batch_size)

    def _normalised(
        self, rows: list[int], batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for pixels, labels in _pixel_batches(
            self.samples,
            rows,
            batch_size=batch_size,
            channels=self.channels,
            size=self.size,
            num_workers=self.num_workers,
        ):
            yield preprocess_images(pixels, self), labels


def compute_mean_std(
    samples: Sequence[FolderSample],
    *,
    channels: int,
    size: int,
    max_images: int = 10_000,
    seed: int = 0,
    num_workers: int | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of pixels / 255 over images, streamed.

    All images are used when there are at most ``max_images``, else the ``max_images`` drawn
    without replacement by ``numpy.random.default_rng(seed).choice``. Sums are accumulated in
    float64; the standard deviation is the population one (numpy's ``std``), floored at
    :data:`MIN_STD` so that normalising constant images does not divide by zero.

    Args:
        samples: the images (the training split's).
        channels: 1 or 3.
        size: the side images are resized and centre-cropped to, as for training.
        max_images: the most images read (at least 1).
        seed: seed of the sample drawn when there are more images.
        num_workers: decoding worker processes; None for :func:`default_num_workers`.

    Returns:
        (mean, std), each a tuple of ``channels`` floats.

    Raises:
        ConfigError: no samples, or an argument out of range.
        FormatError: an image is unreadable, truncated or corrupt; the message names it.
    """
    if not samples:
        raise ConfigError("no images to compute the mean and standard deviation of")
    if max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    if len(samples) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(len(samples), max_images, replace=False))
    else:
        rows = np.arange(len(samples))
    totals = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for pixels, _ in _pixel_batches(
        samples,
        rows.tolist(),
        batch_size=_STATISTICS_BATCH,
        channels=channels,
        size=size,
        num_workers=default_num_workers(len(rows)) if num_workers is None else num_workers,
    ):
        values = pixels.to(torch.float64) / 255.0
        totals += values.sum(dim=(0, 2, 3))
        squares += values.square().sum(dim=(0, 2, 3))
    count = len(rows) * size * size
    mean = totals / count
    std = (squares / count - mean.square()).clamp(min=0.0).sqrt().clamp(min=MIN_STD)
    return tuple(mean.tolist()), tuple(std.tolist())


def folder_dataset_spec(
    folder: ImageFolderData, *, size: int, mean: Sequence[float], std: Sequence[float]
) -> DatasetSpec:
    """What a model trained on a scanned folder takes: its classes and channels, ``size``
    (resize and centre crop) and the given normalisation."""
    return DatasetSpec(
        name=FOLDER_DATASET,
        num_classes=len(folder.class_names),
        in_channels=folder.channels,
        image_size=size,
        mean=tuple(mean),
        std=tuple(std),
        class_names=folder.class_names,
    )

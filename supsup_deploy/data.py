"""Datasets, continual-learning task protocols and per-task data splits.

Whole dataset splits are loaded into memory as uint8 tensors from the official files (IDX for
Fashion-MNIST, the binary distributions for CIFAR-10/100; never Python pickles). Randomness:
every seeded choice uses ``numpy.random.default_rng`` with the ``SeedSequence`` entropy list
written in its docstring, so it depends only on the seed and those integers; mini-batch order
draws from the ``torch.Generator`` passed to ``iterate_batches``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from supsup_deploy.errors import ConfigError, DatasetNotFoundError, FormatError

SPLITS = ("train", "test")
PROTOCOLS = ("split", "random")
FOLDER_DATASET = "image-folder"
"""The dataset name a run (and the bundle packed from it) records for an image folder."""
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_ROOT = Path.home() / ".cache" / "supsup"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset; mean/std are per channel on [0, 1] pixels."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    """One whole split in memory: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_SPECS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="fashion-mnist",
            num_classes=10,
            in_channels=1,
            image_size=28,
            mean=(0.2860,),
            std=(0.3530,),
            class_names=FASHION_MNIST_CLASSES,
        ),
        # CIFAR statistics are the published whole-training-set values (not recomputed here).
        DatasetSpec(
            name="cifar10",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            class_names=CIFAR10_CLASSES,
        ),
        DatasetSpec(
            name="cifar100",
            num_classes=100,
            in_channels=3,
            image_size=32,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            class_names=tuple(f"class_{index}" for index in range(100)),
        ),
    )
}
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    files: dict[str, tuple[str, ...]]
    label_bytes: int  # bytes before the pixels in each record
    names_file: str
    url: str


_CIFAR = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-bin",
        files={
            "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test": ("test_batch.bin",),
        },
        label_bytes=1,
        names_file="batches.meta.txt",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-binary",
        files={"train": ("train.bin",), "test": ("test.bin",)},
        label_bytes=2,  # coarse label, then the fine label we use
        names_file="fine_label_names.txt",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    ),
}


def _require(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def canonical_name(name: str) -> str:
    """Maps an accepted spelling ("Fashion_MNIST", "fashionmnist", "CIFAR-10") to its name.

    Raises:
        ConfigError: the name is not a known dataset.
    """
    key = name.strip().lower().replace("_", "").replace("-", "")
    key = "fashion-mnist" if key == "fashionmnist" else key
    _require(key in _SPECS, f"unknown dataset {name!r}; known: {', '.join(_SPECS)}")
    return key


def get_dataset_spec(name: str) -> DatasetSpec:
    """Returns the built-in spec of a dataset (class names from constants, not from files)."""
    return _SPECS[canonical_name(name)]


def load_dataset(
    name: str, *, split: str = "train", data_root: str | Path | None = None
) -> Dataset:
    """Loads a whole dataset split into memory.

    Args:
        name: dataset name, any spelling ``canonical_name`` accepts.
        split: "train" or "test".
        data_root: folder holding the files or their standard sub-folder; None searches
            /usr/share/datasets (Fashion-MNIST only), then ~/.cache/supsup/NAME.

    Returns:
        The split's uint8 images [N, C, H, W], int64 labels [N] and its spec (CIFAR class names
        come from the meta text file when present).

    Raises:
        ConfigError: unknown name or split.
        DatasetNotFoundError: the files are in none of the folders searched.
        FormatError: a file is truncated or corrupt; the message names it.
    """
    spec = get_dataset_spec(name)
    _require(split in SPLITS, f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    root = Path(data_root).expanduser() if data_root is not None else None
    if spec.name == "fashion-mnist":
        return _load_fashion_mnist(spec, split, root)
    return _load_cifar(spec, split, root)


def _find_fashion_files(folders: list[Path], split: str) -> tuple[Path, Path] | None:
    for folder in folders:
        found: list[Path] = []
        for stem in _FASHION_FILES[split]:
            found += [path for path in (folder / f"{stem}.gz", folder / stem) if path.is_file()][:1]
        if len(found) == 2:
            return found[0], found[1]
    return None


def _load_fashion_mnist(spec: DatasetSpec, split: str, root: Path | None) -> Dataset:
    top = root if root is not None else CACHE_ROOT / "fashion-mnist"
    base = [root, root / "fashion-mnist"] if root is not None else [DEBIAN_FASHION_MNIST, top]
    # torchvision's download layout, under data_root or the cache.
    folders = [*base, top / "FashionMNIST" / "raw"]
    paths = _find_fashion_files(folders, split)
    if paths is None:
        raise DatasetNotFoundError(
            f"fashion-mnist {split} IDX files not found; looked in: "
            f"{', '.join(map(str, folders))}. To get them: apt-get install dataset-fashion-mnist, "
            "or pass --data-root FOLDER with the four IDX files (train-/t10k-*-ubyte[.gz])"
        )
    images, labels = (_read_idx(path) for path in paths)
    if images.ndim != 3 or images.shape[1:] != (spec.image_size, spec.image_size):
        raise FormatError(f"{paths[0]}: expected 28x28 images, header declares {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise FormatError(f"{paths[1]}: holds {labels.shape} labels for {images.shape[0]} images")
    if labels.size and int(labels.max()) >= spec.num_classes:
        raise FormatError(f"{paths[1]}: label {int(labels.max())} out of range")
    images_tensor = torch.from_numpy(np.array(images)).unsqueeze(1)
    return Dataset(images_tensor, torch.from_numpy(labels.astype(np.int64)), spec)


def _read_idx(path: Path) -> np.ndarray:
    """Parses an unsigned-byte IDX file (gzipped when the name ends in .gz); cached in-process."""
    status = path.stat()
    return _parse_idx(str(path.resolve()), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=8)
def _parse_idx(path: str, _modified_ns: int, _size: int) -> np.ndarray:
    # Modification time and size are in the cache key so that a replaced file is re-read.
    try:
        with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise FormatError(f"{path}: cannot read IDX file ({error})") from error
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise FormatError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    header_size = 4 + 4 * raw[3]
    if len(raw) < header_size:
        raise FormatError(f"{path}: truncated IDX file (incomplete header)")
    shape = tuple(int(size) for size in np.frombuffer(raw, ">u4", count=raw[3], offset=4))
    expected = header_size + math.prod(shape)
    if len(raw) != expected:
        raise FormatError(
            f"{path}: truncated or corrupt IDX file: header declares shape {shape} "
            f"({expected} bytes), file has {len(raw)} bytes"
        )
    # Read-only (a view of bytes), so the cached array cannot be changed; callers copy it.
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape)


def _load_cifar(spec: DatasetSpec, split: str, root: Path | None) -> Dataset:
    layout = _CIFAR[spec.name]
    base = root if root is not None else CACHE_ROOT / spec.name
    folders = [base, base / layout.folder]
    files = layout.files[split]

    def find() -> Path | None:
        matches = (folder for folder in folders if all((folder / f).is_file() for f in files))
        return next(matches, None)

    folder = find()
    if folder is None:
        raise DatasetNotFoundError(
            f"{spec.name} {split} binary files ({', '.join(files)}) not found; looked in: "
            f"{', '.join(map(str, folders))}. To get them: download and unpack {layout.url} "
            "and pass --data-root FOLDER"
        )
    record_size = layout.label_bytes + 3 * 32 * 32
    records = []
    for file in files:
        raw = np.fromfile(folder / file, dtype=np.uint8)
        if raw.size == 0 or raw.size % record_size:
            raise FormatError(
                f"{folder / file}: truncated or corrupt CIFAR binary file "
                f"({raw.size} bytes is not a multiple of {record_size})"
            )
        records.append(raw.reshape(-1, record_size))
    table = np.concatenate(records)
    labels = table[:, layout.label_bytes - 1].astype(np.int64)
    if int(labels.max()) >= spec.num_classes:
        raise FormatError(f"{folder}: label {int(labels.max())} out of range in {spec.name} files")
    # Each record's pixels are the red, green and blue 32x32 planes, each row-major.
    images = np.ascontiguousarray(table[:, layout.label_bytes :]).reshape(-1, 3, 32, 32)
    names_path = folder / layout.names_file
    if names_path.is_file():
        names = tuple(line.strip() for line in names_path.read_text().splitlines() if line.strip())
        if len(names) == spec.num_classes:
            spec = dataclasses.replace(spec, class_names=names)
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels), spec)


@dataclass(frozen=True)
class TaskSpec:
    """One task: task label j is original dataset class ``classes[j]``; ``index`` is 0-based."""

    index: int
    classes: tuple[int, ...]
    name: str
    protocol: str = "custom"
    seed: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_names(self, spec: DatasetSpec) -> tuple[str, ...]:
        """Returns the dataset's names of this task's classes, in task label order."""
        return tuple(spec.class_names[original] for original in self.classes)


def make_tasks(
    *, protocol: str, num_classes: int, classes_per_task: int, num_tasks: int, seed: int
) -> list[TaskSpec]:
    """Builds a seeded continual-learning task sequence.

    "split": ``default_rng(seed).permutation(num_classes)`` cut into consecutive disjoint groups.
    "random": task i draws ``classes_per_task`` distinct classes, in random order, from
    ``default_rng([seed, i])``, drawing again from that generator while the set (unordered)
    equals an earlier task's, so no two tasks share a class set and task i does not depend on
    ``num_tasks``. There must be at least ``num_tasks`` such sets.

    Args:
        protocol: "split" or "random".
        num_classes: classes in the dataset.
        classes_per_task: classes per task (at least 2).
        num_tasks: tasks to build (at least 1).
        seed: non-negative seed.

    Returns:
        The tasks, indexed 0..num_tasks-1 and named "task_<index>".

    Raises:
        ConfigError: an argument is out of range or the classes do not suffice.
    """
    _require(protocol in PROTOCOLS, f"unknown task protocol {protocol!r}; use split or random")
    _require(seed >= 0, f"seed must be non-negative, got {seed}")
    _require(num_tasks >= 1, f"num_tasks must be at least 1, got {num_tasks}")
    _require(
        2 <= classes_per_task <= num_classes,
        f"classes_per_task must be in [2, {num_classes}], got {classes_per_task}",
    )
    if protocol == "split":
        _require(
            num_tasks * classes_per_task <= num_classes,
            f"the split protocol needs num_tasks * classes_per_task <= num_classes, got "
            f"{num_tasks} * {classes_per_task} > {num_classes}; use fewer tasks or 'random'",
        )
        order = np.random.default_rng(seed).permutation(num_classes)
        groups = np.split(order[: num_tasks * classes_per_task], num_tasks)
    else:
        sets = math.comb(num_classes, classes_per_task)
        _require(
            num_tasks <= sets,
            f"the random protocol draws a distinct class set per task, but {num_classes} classes "
            f"give only {sets} sets of {classes_per_task}: use at most {sets} tasks",
        )
        groups, drawn = [], set()
        for i in range(num_tasks):
            rng = np.random.default_rng([seed, i])
            group = rng.choice(num_classes, classes_per_task, replace=False)
            while frozenset(group.tolist()) in drawn:
                group = rng.choice(num_classes, classes_per_task, replace=False)
            drawn.add(frozenset(group.tolist()))
            groups.append(group)
    classes = [tuple(int(c) for c in group) for group in groups]
    return [TaskSpec(i, classes[i], f"task_{i}", protocol, seed) for i in range(num_tasks)]


def parse_classes(text: str | None, spec: DatasetSpec) -> tuple[int, ...]:
    """The dataset classes a run draws its tasks from: ``"1,3,5"`` (class ids), or all of them.

    Args:
        text: comma-separated class ids as typed after ``--classes``, or None for every class.
        spec: the dataset's spec.

    Returns:
        The class ids, in the order given.

    Raises:
        ConfigError: an id that is not a number in range, a repeated id, or fewer than 2 ids.
    """
    if text is None:
        return tuple(range(spec.num_classes))
    items = [item.strip() for item in text.split(",")]
    _require(
        all(item.isascii() and item.isdigit() for item in items),
        f"--classes takes comma-separated class ids such as 1,3,5; got {text!r}",
    )
    classes = tuple(int(item) for item in items)
    _require(
        all(0 <= c < spec.num_classes for c in classes),
        f"--classes {text}: {spec.name} has classes 0..{spec.num_classes - 1}",
    )
    _require(len(set(classes)) == len(classes), f"--classes {text}: a class is repeated")
    _require(len(classes) >= 2, f"--classes {text}: give at least 2 classes")
    return classes


def tasks_over_classes(tasks: Sequence[TaskSpec], classes: Sequence[int]) -> list[TaskSpec]:
    """Tasks drawn over positions ``0..len(classes)-1`` mapped to those dataset class ids."""
    return [
        dataclasses.replace(task, classes=tuple(classes[c] for c in task.classes)) for task in tasks
    ]


def protocol_record(tasks: Sequence[TaskSpec]) -> dict:
    """Returns a JSON-serialisable record of a task sequence's protocol, seed and classes."""
    _require(
        len({(task.protocol, task.seed) for task in tasks}) == 1,
        "protocol_record needs a non-empty task list sharing one protocol and seed",
    )
    tasks_json = [{"index": t.index, "name": t.name, "classes": list(t.classes)} for t in tasks]
    return {"protocol": tasks[0].protocol, "seed": tasks[0].seed, "tasks": tasks_json}


class LabelledImages(Protocol):
    """One split of a task as training reads it: normalised float32 images and task labels,
    batch by batch (in memory, :class:`TensorPair`, or streamed from files,
    :class:`~supsup_deploy.image_folder.ImageFolderSplit`)."""

    def __len__(self) -> int: ...

    def batches(
        self, *, batch_size: int, shuffle: bool, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class TensorPair:
    """Normalised float32 images [N, C, H, W], task labels 0..k-1 [N], and their source rows."""

    images: torch.Tensor
    labels: torch.Tensor
    source_indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self, *, batch_size: int, shuffle: bool, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches covering every sample once (:func:`iterate_batches`)."""
        return iterate_batches(
            self.images, self.labels, batch_size=batch_size, shuffle=shuffle, generator=generator
        )


@dataclass(frozen=True)
class TaskSplits:
    """A task's training, validation and test data."""

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    task: TaskSpec


def task_splits(
    train: Dataset,
    test: Dataset,
    task: TaskSpec,
    *,
    val_fraction: float = 0.1,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int,
) -> TaskSplits:
    """Selects, relabels, splits, caps and normalises one task's data.

    Validation takes ``round(val_fraction * n)`` samples of every class (stratified) from the
    training split; the training cap is then a random subset of the rest. Training-side choices
    use ``default_rng([seed, task.index, 0])``, the test cap ``default_rng([seed, task.index, 1])``;
    rows keep their dataset order, so the same (seed, task) always gives the same rows.

    Args:
        train: the dataset's training split.
        test: the dataset's test split.
        task: the task whose classes to select.
        val_fraction: share of each class's training samples held out, in [0, 1).
        max_train_samples: cap on training samples (after validation is carved), or None.
        max_test_samples: cap on test samples, or None.
        seed: non-negative seed.

    Returns:
        The task's train/val/test tensors.
    """
    spec = train.spec
    _require(test.spec.name == spec.name, f"train is {spec.name} but test is {test.spec.name}")
    _require(
        len(set(task.classes)) == len(task.classes) >= 1
        and all(0 <= c < spec.num_classes for c in task.classes),
        f"{task.name} classes {task.classes} are repeated or out of range for {spec.name}",
    )
    _require(0.0 <= val_fraction < 1.0, f"val_fraction must be in [0, 1), got {val_fraction}")
    for label, cap in (
        ("max_train_samples", max_train_samples),
        ("max_test_samples", max_test_samples),
    ):
        _require(cap is None or cap >= 1, f"{label} must be at least 1 or None, got {cap}")
    _require(seed >= 0, f"seed must be non-negative, got {seed}")

    lookup = np.full(spec.num_classes, -1, dtype=np.int64)
    lookup[list(task.classes)] = np.arange(task.num_classes)
    train_labels = lookup[train.labels.numpy()]
    test_labels = lookup[test.labels.numpy()]

    rng = np.random.default_rng([seed, task.index, 0])
    val_rows, train_rows = [], []
    for task_label in range(task.num_classes):
        rows = rng.permutation(np.flatnonzero(train_labels == task_label))
        held_out = round(val_fraction * rows.size)
        val_rows.append(rows[:held_out])
        train_rows.append(rows[held_out:])
    kept_train = np.concatenate(train_rows)
    if max_train_samples is not None and kept_train.size > max_train_samples:
        kept_train = rng.choice(kept_train, max_train_samples, replace=False)
    kept_test = np.flatnonzero(test_labels >= 0)
    if max_test_samples is not None and kept_test.size > max_test_samples:
        test_rng = np.random.default_rng([seed, task.index, 1])
        kept_test = test_rng.choice(kept_test, max_test_samples, replace=False)

    def pair(source: Dataset, labels: np.ndarray, rows: np.ndarray) -> TensorPair:
        indices = torch.from_numpy(np.sort(rows))
        images = preprocess_images(source.images[indices], spec)
        return TensorPair(images, torch.from_numpy(labels[indices.numpy()]), indices)

    val = pair(train, train_labels, np.concatenate(val_rows))
    return TaskSplits(
        pair(train, train_labels, kept_train), val, pair(test, test_labels, kept_test), task
    )


def preprocess_images(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Converts uint8 images [N, C, H, W] to float32 ``(pixel / 255 - mean) / std`` per channel.

    ``spec`` is any object with per-channel ``mean`` and ``std`` (a bundle's InputSpec too).
    """
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


def first_images(images: LabelledImages, count: int) -> torch.Tensor:
    """The first ``count`` images of a split (fewer if it holds fewer), in stored order."""
    return next(iter(images.batches(batch_size=count, shuffle=False, generator=None)))[0]


def pixels_from_inputs(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """The uint8 pixels that :func:`preprocess_images` made ``images`` from (exact: the error of
    normalising in float32 is far below half a pixel step)."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return ((images * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields mini-batches covering every sample once (the last batch may be smaller).

    Args:
        images: [N, C, H, W] tensor (normalised float for training).
        labels: [N] tensor.
        batch_size: samples per batch (at least 1).
        shuffle: visit samples in ``torch.randperm(N, generator=generator)`` order.
        generator: source of the order's randomness; None uses torch's global RNG.

    Returns:
        An iterator of (images, labels) batches on the inputs' device.
    """
    _require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
    _require(len(images) == len(labels), f"{len(images)} images but {len(labels)} labels")
    random_device = generator.device if generator is not None else torch.device("cpu")
    if shuffle:
        order = torch.randperm(len(images), generator=generator, device=random_device)
    else:
        order = torch.arange(len(images))
    for start in range(0, len(images), batch_size):
        rows = order[start : start + batch_size]
        yield images[rows.to(images.device)], labels[rows.to(labels.device)]

"""Tests for supsup_deploy.data: dataset files, task protocols, per-task splits and batching."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from supsup_deploy import data
from supsup_deploy.errors import ConfigError, DatasetNotFoundError, SupsupError

FASHION_FOLDER = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fashion() -> tuple[data.Dataset, data.Dataset]:
    if not (FASHION_FOLDER / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return data.load_dataset("fashion-mnist"), data.load_dataset("fashion-mnist", split="test")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Writes an unsigned-byte IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fashion_files(folder: Path, count: int = 6, suffix: str = "") -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images


# Dataset loading -------------------------------------------------------------------------------


def test_fashion_mnist_shapes_and_counts(fashion: tuple[data.Dataset, data.Dataset]) -> None:
    train, test = fashion
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert test.images.shape == (10000, 1, 28, 28)
    for split in (train, test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_fashion_mnist_spec_matches_data(fashion: tuple[data.Dataset, data.Dataset]) -> None:
    train, _ = fashion
    pixels = train.images.to(torch.float64) / 255
    assert pixels.mean().item() == pytest.approx(train.spec.mean[0], abs=1e-4)
    assert pixels.std().item() == pytest.approx(train.spec.std[0], abs=1e-4)
    assert train.spec == data.get_dataset_spec("fashion-mnist")


def test_repeated_load_is_cached_and_isolated(fashion: tuple[data.Dataset, data.Dataset]) -> None:
    train, _ = fashion
    first_pixel = int(train.images[0, 0, 0, 0])
    again = data.load_dataset("Fashion_MNIST")
    again.images[0, 0, 0, 0] = first_pixel + 1
    assert int(data.load_dataset("fashionmnist").images[0, 0, 0, 0]) == first_pixel
    assert data._parse_idx.cache_info().hits >= 2


def test_names_and_splits() -> None:
    assert data.get_dataset_spec("CIFAR-100").num_classes == 100
    assert data.get_dataset_spec("FashionMNIST").name == "fashion-mnist"
    with pytest.raises(ConfigError, match="unknown dataset"):
        data.get_dataset_spec("mnist")
    with pytest.raises(ConfigError, match="unknown split"):
        data.load_dataset("cifar10", split="validation")


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_synthetic_idx_files_in_each_layout(tmp_path: Path, layout: str, suffix: str) -> None:
    images = write_fashion_files(tmp_path / layout, suffix=suffix)
    loaded = data.load_dataset("fashion-mnist", split="test", data_root=tmp_path)
    assert torch.equal(loaded.images[:, 0], torch.from_numpy(images))
    assert loaded.labels.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_idx_file_names_the_file(tmp_path: Path, suffix: str) -> None:
    write_fashion_files(tmp_path, suffix=suffix)
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(SupsupError, match="train-images-idx3-ubyte"):
        data.load_dataset("fashion-mnist", data_root=tmp_path)


def test_bad_magic_number(tmp_path: Path) -> None:
    write_fashion_files(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(SupsupError, match="magic number"):
        data.load_dataset("fashion-mnist", data_root=tmp_path)


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "cifar100"])
def test_missing_data_root_names_the_folder(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as caught:
        data.load_dataset(name, data_root=missing)
    message = str(caught.value)
    assert str(missing) in message and "\n" not in message and "To get them" in message


# CIFAR binary files ----------------------------------------------------------------------------


def cifar_records(count: int, label_bytes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    records = rng.integers(0, 256, (count, label_bytes + 3072), dtype=np.uint8)
    records[:, :label_bytes] = rng.integers(0, 10, (count, label_bytes))
    return records


def test_cifar10_binary_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    batches = [cifar_records(2, 1, seed) for seed in range(5)]
    for number, records in enumerate(batches, start=1):
        (folder / f"data_batch_{number}.bin").write_bytes(records.tobytes())
    (folder / "test_batch.bin").write_bytes(cifar_records(3, 1, 9).tobytes())
    names = [f"name{index}" for index in range(10)]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")

    train = data.load_dataset("cifar10", data_root=tmp_path)
    raw = np.concatenate(batches)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == raw[:, 0].tolist()
    # Official layout: 1 label byte, then the red, green and blue planes, each 32x32 row-major.
    for record, channel, row, column in [(0, 0, 0, 0), (3, 1, 5, 7), (9, 2, 31, 30)]:
        offset = 1 + channel * 1024 + row * 32 + column
        assert int(train.images[record, channel, row, column]) == raw[record, offset]
    assert train.spec.class_names == tuple(names)
    assert len(data.load_dataset("cifar10", split="test", data_root=folder)) == 3


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    records = cifar_records(4, 2, 1)
    records[:, 0] = 19
    records[:, 1] = [0, 42, 99, 7]
    (tmp_path / "train.bin").write_bytes(records.tobytes())
    train = data.load_dataset("cifar100", data_root=tmp_path)
    assert train.labels.tolist() == [0, 42, 99, 7]
    assert torch.equal(train.images.reshape(4, -1), torch.from_numpy(records[:, 2:]))
    assert train.spec.class_names[42] == "class_42"


def test_truncated_cifar_file(tmp_path: Path) -> None:
    (tmp_path / "test.bin").write_bytes(cifar_records(2, 2, 0).tobytes()[:-1])
    with pytest.raises(SupsupError, match=r"test\.bin"):
        data.load_dataset("cifar100", split="test", data_root=tmp_path)


# Task protocols --------------------------------------------------------------------------------


def test_split_protocol_is_disjoint_and_covering() -> None:
    tasks = data.make_tasks(
        protocol="split", num_classes=100, classes_per_task=5, num_tasks=20, seed=3
    )
    assert [task.name for task in tasks[:2]] == ["task_0", "task_1"]
    assert sorted(c for task in tasks for c in task.classes) == list(range(100))
    assert all(len(task.classes) == 5 for task in tasks)
    with pytest.raises(ConfigError, match="num_tasks \\* classes_per_task"):
        data.make_tasks(protocol="split", num_classes=10, classes_per_task=3, num_tasks=4, seed=0)


def test_random_protocol_subsets() -> None:
    tasks = data.make_tasks(
        protocol="random", num_classes=10, classes_per_task=4, num_tasks=50, seed=1
    )
    assert all(len(set(task.classes)) == 4 for task in tasks)
    assert all(0 <= c < 10 for task in tasks for c in task.classes)
    assert len({frozenset(task.classes) for task in tasks}) == 50
    fewer = data.make_tasks(
        protocol="random", num_classes=10, classes_per_task=4, num_tasks=3, seed=1
    )
    assert fewer == tasks[:3]


def test_random_protocol_never_repeats_a_class_set() -> None:
    """Seed 0 with 2 of 10 classes once drew {4, 8} for tasks 1, 3 and 4: every set is now new,
    and all 45 pairs can be drawn, but not 46."""
    first = [np.random.default_rng([0, i]).choice(10, 2, replace=False) for i in range(5)]
    assert len({frozenset(group.tolist()) for group in first}) < 5
    tasks = data.make_tasks(
        protocol="random", num_classes=10, classes_per_task=2, num_tasks=45, seed=0
    )
    assert len({frozenset(task.classes) for task in tasks}) == 45
    assert tasks[0].classes == tuple(int(c) for c in first[0])
    with pytest.raises(ConfigError, match="only 45 sets of 2: use at most 45 tasks"):
        data.make_tasks(protocol="random", num_classes=10, classes_per_task=2, num_tasks=46, seed=0)


@pytest.mark.parametrize("protocol", ["split", "random"])
def test_protocols_are_seeded(protocol: str) -> None:
    def build(seed: int) -> list[data.TaskSpec]:
        return data.make_tasks(
            protocol=protocol, num_classes=20, classes_per_task=2, num_tasks=10, seed=seed
        )

    assert build(7) == build(7)
    assert [task.classes for task in build(7)] != [task.classes for task in build(8)]


@pytest.mark.parametrize(
    ("protocol", "classes_per_task", "num_tasks", "seed"),
    [
        ("rotate", 2, 2, 0),
        ("split", 1, 2, 0),
        ("split", 11, 1, 0),
        ("random", 2, 0, 0),
        ("random", 2, 2, -1),
    ],
)
def test_protocol_validation(
    protocol: str, classes_per_task: int, num_tasks: int, seed: int
) -> None:
    with pytest.raises(ConfigError):
        data.make_tasks(
            protocol=protocol,
            num_classes=10,
            classes_per_task=classes_per_task,
            num_tasks=num_tasks,
            seed=seed,
        )


def test_protocol_record_round_trip() -> None:
    tasks = data.make_tasks(
        protocol="random", num_classes=10, classes_per_task=3, num_tasks=4, seed=5
    )
    record = json.loads(json.dumps(data.protocol_record(tasks)))
    assert record["protocol"] == "random" and record["seed"] == 5
    assert record["tasks"][2]["classes"] == list(tasks[2].classes)
    assert [tuple(task["classes"]) for task in record["tasks"]] == [t.classes for t in tasks]
    spec = data.get_dataset_spec("cifar10")
    assert tasks[0].class_names(spec) == tuple(spec.class_names[c] for c in tasks[0].classes)


# Per-task splits -------------------------------------------------------------------------------


def test_task_splits_relabel_and_split(fashion: tuple[data.Dataset, data.Dataset]) -> None:
    train, test = fashion
    task = data.TaskSpec(index=2, classes=(7, 3), name="task_2")
    splits = data.task_splits(train, test, task, val_fraction=0.1, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10800, 1200, 2000)
    for pair, source in ((splits.train, train), (splits.val, train), (splits.test, test)):
        assert pair.images.dtype == torch.float32 and pair.images.shape[1:] == (1, 28, 28)
        assert set(pair.labels.tolist()) == {0, 1}
        original = source.labels[pair.source_indices]
        assert torch.equal(original, torch.tensor(task.classes)[pair.labels])
        expected = data.preprocess_images(source.images[pair.source_indices], train.spec)
        assert torch.equal(pair.images, expected)
    assert torch.bincount(splits.val.labels).tolist() == [600, 600]
    train_rows = set(splits.train.source_indices.tolist())
    assert not train_rows & set(splits.val.source_indices.tolist())

    again = data.task_splits(train, test, task, val_fraction=0.1, seed=0)
    other = data.task_splits(train, test, task, val_fraction=0.1, seed=1)
    assert torch.equal(again.val.source_indices, splits.val.source_indices)
    assert not torch.equal(other.val.source_indices, splits.val.source_indices)


def test_task_splits_caps(fashion: tuple[data.Dataset, data.Dataset]) -> None:
    train, test = fashion
    task = data.TaskSpec(index=0, classes=(0, 1, 2), name="task_0")

    def build() -> data.TaskSplits:
        return data.task_splits(
            train, test, task, val_fraction=0.2, max_train_samples=500, max_test_samples=100, seed=4
        )

    splits = build()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (500, 3600, 100)
    assert not set(splits.train.source_indices.tolist()) & set(splits.val.source_indices.tolist())
    assert torch.equal(build().train.source_indices, splits.train.source_indices)
    assert torch.equal(build().test.source_indices, splits.test.source_indices)
    with pytest.raises(ConfigError):
        data.task_splits(train, test, task, val_fraction=1.0, seed=0)


# Batching --------------------------------------------------------------------------------------


def test_iterate_batches_covers_every_sample_once() -> None:
    images = torch.arange(23, dtype=torch.float32).view(23, 1, 1, 1).expand(23, 1, 4, 4)
    labels = torch.arange(23)
    batches = list(
        data.iterate_batches(
            images, labels, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
    )
    assert [len(batch_labels) for _, batch_labels in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([batch_labels for _, batch_labels in batches])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    for batch_images, batch_labels in batches:
        assert torch.equal(batch_images[:, 0, 0, 0], batch_labels.float())
    ordered = data.iterate_batches(images, labels, batch_size=10, shuffle=False, generator=None)
    assert torch.cat([batch_labels for _, batch_labels in ordered]).tolist() == list(range(23))

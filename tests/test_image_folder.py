"""Image files to pixels (supsup_deploy.images) and image folders as streamed splits
(supsup_deploy.image_folder): conversions, layouts, carving, errors, batches and statistics."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from supsup_deploy import data as datasets
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.image_folder import (
    MIN_STD,
    FolderSample,
    ImageFolderSplit,
    compute_mean_std,
    default_num_workers,
    scan_image_folder,
)
from supsup_deploy.images import open_image, read_pixels, to_pixels


def _random_rgb(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _palette_image(transparency: int | None) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def _sixteen_bit(mode: str, value: int) -> Image.Image:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (4, 4), np.full((4, 4), value, dtype).tobytes())


def _assert_one_line(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message


# Constant 4x4 images (converted at size 4, so not resampled) and the value each channel gets.
MODE_CASES = {
    "1": (Image.new("1", (4, 4), 1), (255,), (255, 255, 255)),
    "L": (Image.new("L", (4, 4), 100), (100,), (100, 100, 100)),
    "LA, alpha dropped": (Image.new("LA", (4, 4), (100, 0)), (100,), (100, 100, 100)),
    "P": (_palette_image(None), (18,), (10, 20, 30)),
    "P with transparency": (_palette_image(1), (18,), (10, 20, 30)),
    "PA": (Image.new("PA", (4, 4), (0, 0)), (0,), (0, 0, 0)),
    "RGB": (Image.new("RGB", (4, 4), (10, 20, 30)), (18,), (10, 20, 30)),
    "RGBA, alpha dropped": (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (18,), (10, 20, 30)),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255,), (255, 255, 255)),
    "YCbCr": (Image.new("YCbCr", (4, 4), (128, 128, 128)), (128,), (128, 128, 128)),
    "I;16, top byte": (_sixteen_bit("I;16", 0x8000), (128,), (128, 128, 128)),
    "I;16B, top byte": (_sixteen_bit("I;16B", 0x12FF), (0x12,), (0x12, 0x12, 0x12)),
    "I;16L, top byte": (_sixteen_bit("I;16L", 0xFFFF), (255,), (255, 255, 255)),
    "I, clipped to 16 bits": (Image.new("I", (4, 4), 70_000), (255,), (255, 255, 255)),
    "I, top byte": (Image.new("I", (4, 4), 0x3456), (0x34,), (0x34, 0x34, 0x34)),
    "F, clipped": (Image.new("F", (4, 4), 300.0), (255,), (255, 255, 255)),
    "F, negative": (Image.new("F", (4, 4), -5.0), (0,), (0, 0, 0)),
}


@pytest.mark.parametrize("case", MODE_CASES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_converts_to_uint8_pixels(case, channels):
    image, grey, colour = MODE_CASES[case]
    pixels = to_pixels(image, channels=channels, size=4)
    assert pixels.dtype == torch.uint8
    assert pixels.shape == (channels, 4, 4)
    expected = grey if channels == 1 else colour
    assert pixels.flatten(1).unique(dim=1).flatten().tolist() == list(expected)


def test_sixteen_bit_png_spans_the_eight_bit_range(tmp_path):
    values = (np.arange(16 * 16, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with open_image(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
    pixels = read_pixels(tmp_path / "deep.png", channels=1, size=16)
    assert np.array_equal(pixels[0].numpy(), (values >> 8).astype(np.uint8))
    assert int(pixels.max()) == 255 and len(pixels.unique()) == 256


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"])
@pytest.mark.parametrize("size", [8, 23, 40])
def test_square_images_match_the_old_convert_and_resize(mode, size):
    source = _random_rgb(0, 23, 23)
    image = source.quantize(40) if mode == "P" else source.convert(mode)
    for channels, target in ((1, "L"), (3, "RGB")):
        old = np.array(image.convert(target).resize((size, size), Image.BILINEAR))
        old = old[None] if old.ndim == 2 else old.transpose(2, 0, 1)
        assert np.array_equal(to_pixels(image, channels=channels, size=size).numpy(), old)


@pytest.mark.parametrize("width, height", [(45, 30), (30, 45), (9, 61)])
@pytest.mark.parametrize("size", [16, 50])
def test_non_square_images_match_torchvision_resize_and_centre_crop(width, height, size):
    image = _random_rgb(1, width, height)
    pipeline = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()]
    )
    for channels, mode in ((1, "L"), (3, "RGB")):
        expected = pipeline(image.convert(mode))
        assert torch.equal(to_pixels(image, channels=channels, size=size), expected)


def test_unreadable_files_and_bombs_are_refused_in_one_line(tmp_path, monkeypatch):
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(FormatError) as error:
        open_image(junk)
    _assert_one_line(error, junk)
    with pytest.raises(FormatError) as error:
        read_pixels(tmp_path / "missing.png", channels=1, size=4)
    _assert_one_line(error, tmp_path / "missing.png")

    picture = tmp_path / "picture.png"
    _random_rgb(2, 40, 30).save(picture)
    # Pillow warns between the limit and twice it, and raises above that: both are refused.
    for limit in (40 * 30 - 1, 40 * 30 // 2 - 1):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(FormatError, match="decompression bomb") as error:
            open_image(picture)
        _assert_one_line(error, picture)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30)
    assert read_pixels(picture, channels=3, size=8).shape == (3, 8, 8)


def _truncated_copy(image: Image.Image, path: Path) -> Path:
    image.save(path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_refused_when_decoded(tmp_path, suffix):
    path = _truncated_copy(_random_rgb(3, 64, 64), tmp_path / f"cut{suffix}")
    with open_image(path) as image:
        assert image.size == (64, 64)
    with pytest.raises(FormatError, match="truncated") as error:
        read_pixels(path, channels=3, size=64)
    _assert_one_line(error, path)


def _write_class_folders(root: Path, counts: dict[str, int], *, width=12, height=12) -> None:
    for index, (name, count) in enumerate(counts.items()):
        folder = root / name
        (folder / "nested").mkdir(parents=True)
        for number in range(count):
            where = folder / "nested" if number % 4 == 0 else folder
            _random_rgb(100 * index + number, width, height).save(where / f"{number:03d}.png")


def _all_samples(data) -> list[FolderSample]:
    return [sample for split in ("train", "val", "test") for sample in data.splits[split]]


def test_carved_layout_splits_each_class_and_ignores_non_images(tmp_path):
    _write_class_folders(tmp_path, {"dog": 10, "cat": 10, "ant": 20})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_text("hidden")
    (tmp_path / "README.md").write_text("loose file")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.png").write_text("in a hidden folder")
    checked = []
    data = scan_image_folder(tmp_path, seed=3, progress=checked.append)

    assert data.layout == "carved"
    assert data.class_names == ("ant", "cat", "dog")
    assert checked == list(range(1, 41))
    assert (data.channels, data.image_size) == (3, 12)
    assert data.ignored == tuple(
        sorted(
            [
                tmp_path / ".cache",
                tmp_path / "README.md",
                tmp_path / "cat" / ".hidden.png",
                tmp_path / "cat" / "notes.txt",
            ]
        )
    )
    record = data.record()
    assert record["counts"] == {
        "train": {"ant": 16, "cat": 8, "dog": 8},
        "val": {"ant": 2, "cat": 1, "dog": 1},
        "test": {"ant": 2, "cat": 1, "dog": 1},
    }
    assert record["ignored"] == 4
    paths = [sample.path for sample in _all_samples(data)]
    visible = [path for path in tmp_path.rglob("*.png") if ".hidden" not in path.name]
    assert sorted(paths) == sorted(path for path in visible if ".cache" not in path.parts)
    assert len(set(paths)) == 40
    for sample in _all_samples(data):
        assert data.class_names[sample.label] == sample.path.relative_to(tmp_path).parts[0]


def test_split_is_seeded_recorded_and_independent_of_listing_order(tmp_path, monkeypatch):
    _write_class_folders(tmp_path, {"a": 12, "b": 12})
    data = scan_image_folder(tmp_path, seed=5, val_fraction=0.25, test_fraction=0.25)
    record = data.record()
    assert json.loads(json.dumps(record)) == record
    entries = sorted(
        [split, sample.path.relative_to(tmp_path).as_posix(), sample.label]
        for split, samples in data.splits.items()
        for sample in samples
    )
    listing = json.dumps(entries, separators=(",", ":")).encode("ascii")
    assert record["sha256"] == hashlib.sha256(listing).hexdigest()
    assert record["seed"] == 5 and record["val_fraction"] == record["test_fraction"] == 0.25
    reseeded = scan_image_folder(tmp_path, seed=6, val_fraction=0.25, test_fraction=0.25)
    assert reseeded.record()["sha256"] != record["sha256"]

    real_walk, real_iterdir = os.walk, Path.iterdir

    def reversed_walk(*args, **kwargs):
        for current, folders, files in real_walk(*args, **kwargs):
            folders.reverse()
            files.reverse()
            yield current, folders, files

    monkeypatch.setattr(os, "walk", reversed_walk)
    monkeypatch.setattr(Path, "iterdir", lambda self: reversed(list(real_iterdir(self))))
    again = scan_image_folder(tmp_path, seed=5, val_fraction=0.25, test_fraction=0.25)
    assert again.record() == record
    assert again.splits == data.splits


def test_folders_layout_carves_only_the_missing_splits(tmp_path):
    _write_class_folders(tmp_path / "train", {"x": 10, "y": 10})
    _write_class_folders(tmp_path / "test", {"y": 3})
    data = scan_image_folder(tmp_path, val_fraction=0.2)
    assert data.layout == "folders"
    assert data.class_names == ("x", "y")
    assert data.record()["counts"] == {
        "train": {"x": 8, "y": 8},
        "val": {"x": 2, "y": 2},
        "test": {"x": 0, "y": 3},
    }
    assert all(sample.path.parts[-3:-1] != ("test",) for sample in data.splits["val"])
    assert {sample.path.relative_to(tmp_path).parts[0] for sample in data.splits["test"]} == {
        "test"
    }

    _write_class_folders(tmp_path / "val", {"x": 2, "y": 2})
    full = scan_image_folder(tmp_path)
    assert full.record()["counts"]["train"] == {"x": 10, "y": 10}
    assert {sample.path.relative_to(tmp_path).parts[0] for sample in full.splits["val"]} == {"val"}


def test_channels_and_size_follow_the_images(tmp_path):
    for name, mode in (("a", "L"), ("b", "I;16")):
        (tmp_path / name).mkdir()
        for number in range(3):
            Image.new(mode, (9, 9)).save(tmp_path / name / f"{number}.png")
    assert scan_image_folder(tmp_path).channels == 1
    Image.new("RGB", (9, 9)).save(tmp_path / "a" / "colour.png")
    assert scan_image_folder(tmp_path).channels == 3
    Image.new("L", (9, 10)).save(tmp_path / "b" / "tall.png")
    assert scan_image_folder(tmp_path).image_size == 32


def test_scan_errors_are_one_line_naming_the_path(tmp_path, monkeypatch):
    def refused(error_type, path, **options):
        with pytest.raises(error_type) as error:
            scan_image_folder(path, **options)
        return error

    _assert_one_line(refused(ConfigError, tmp_path / "missing"), tmp_path / "missing")
    (tmp_path / "file.png").write_text("x")
    _assert_one_line(refused(ConfigError, tmp_path / "file.png"), tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    _assert_one_line(refused(ConfigError, tmp_path / "empty"), tmp_path / "empty")

    _write_class_folders(tmp_path / "one", {"only": 3})
    error = refused(ConfigError, tmp_path / "one")
    _assert_one_line(error, tmp_path / "one")
    assert "at least 2 classes" in str(error.value)

    _write_class_folders(tmp_path / "hollow", {"a": 3, "b": 3})
    (tmp_path / "hollow" / "c").mkdir()
    (tmp_path / "hollow" / "c" / "notes.txt").write_text("x")
    _assert_one_line(refused(ConfigError, tmp_path / "hollow"), tmp_path / "hollow" / "c")

    _write_class_folders(tmp_path / "many", {"a": 3, "b": 3, "c": 3})
    error = refused(ConfigError, tmp_path / "many", max_classes=2)
    _assert_one_line(error, tmp_path / "many")
    assert "more classes (3) than allowed (2)" in str(error.value)

    _write_class_folders(tmp_path / "split" / "train", {"a": 3, "b": 3})
    _write_class_folders(tmp_path / "split" / "val", {"a": 1, "z": 1})
    _assert_one_line(refused(ConfigError, tmp_path / "split"), tmp_path / "split" / "val" / "z")

    _write_class_folders(tmp_path / "small", {"a": 6, "b": 2})
    error = refused(ConfigError, tmp_path / "small", val_fraction=0.4, test_fraction=0.4)
    _assert_one_line(error, tmp_path / "small" / "b")

    _write_class_folders(tmp_path / "corrupt", {"a": 2, "b": 2})
    bad = tmp_path / "corrupt" / "b" / "bad.png"
    bad.write_bytes(np.random.default_rng(1).bytes(500))
    _assert_one_line(refused(FormatError, tmp_path / "corrupt"), bad)

    _write_class_folders(tmp_path / "bomb", {"a": 2, "b": 2})
    huge = tmp_path / "bomb" / "a" / "huge.png"
    Image.new("L", (100, 100)).save(huge)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    _assert_one_line(refused(FormatError, tmp_path / "bomb"), huge)


def _in_memory_batches(samples, *, size, mean, std, batch_size, seed):
    pixels = torch.stack([read_pixels(sample.path, channels=3, size=size) for sample in samples])
    labels = torch.tensor([sample.label for sample in samples])
    images = datasets.preprocess_images(
        pixels, datasets.DatasetSpec("x", 2, 3, size, mean, std, ())
    )
    generator = torch.Generator().manual_seed(seed)
    return datasets.iterate_batches(
        images, labels, batch_size=batch_size, shuffle=True, generator=generator
    )


def test_batches_match_the_in_memory_path_with_and_without_workers(tmp_path):
    _write_class_folders(tmp_path, {"a": 9, "b": 8}, width=20, height=14)
    samples = scan_image_folder(tmp_path, val_fraction=0.0, test_fraction=0.0).splits["train"]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = list(_in_memory_batches(samples, size=10, mean=mean, std=std, batch_size=5, seed=7))
    assert [len(labels) for _, labels in expected] == [5, 5, 5, 2]
    for workers in (0, 2):
        split = ImageFolderSplit(
            samples, channels=3, size=10, mean=mean, std=std, num_workers=workers
        )
        batches = split.batches(
            batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7)
        )
        got = list(batches)
        assert len(got) == len(expected)
        for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    in_order = ImageFolderSplit(samples, channels=3, size=10, mean=mean, std=std)
    assert in_order.num_workers == 0 == default_num_workers(len(samples))
    labels = torch.cat(
        [labels for _, labels in in_order.batches(batch_size=4, shuffle=False, generator=None)]
    )
    assert labels.tolist() == [sample.label for sample in samples]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_image_met_while_streaming_raises_one_line(tmp_path, workers):
    _write_class_folders(tmp_path, {"a": 4, "b": 4})
    cut = _truncated_copy(_random_rgb(9, 48, 48), tmp_path / "b" / "cut.jpg")
    data = scan_image_folder(tmp_path, val_fraction=0.0, test_fraction=0.0)
    split = ImageFolderSplit(
        data.splits["train"],
        channels=3,
        size=12,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        num_workers=workers,
    )
    with pytest.raises(FormatError) as error:
        list(split.batches(batch_size=3, shuffle=False, generator=None))
    _assert_one_line(error, cut)


def test_mean_and_std_match_numpy(tmp_path):
    _write_class_folders(tmp_path, {"a": 7, "b": 6}, width=15, height=11)
    samples = scan_image_folder(tmp_path, val_fraction=0.0, test_fraction=0.0).splits["train"]
    pixels = np.stack([read_pixels(s.path, channels=3, size=8).numpy() for s in samples]) / 255.0
    mean, std = compute_mean_std(samples, channels=3, size=8, num_workers=2)
    assert np.allclose(mean, pixels.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(std, pixels.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)

    rows = np.sort(np.random.default_rng(4).choice(len(samples), 5, replace=False))
    mean, std = compute_mean_std(samples, channels=3, size=8, max_images=5, seed=4)
    assert np.allclose(mean, pixels[rows].mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(std, pixels[rows].std(axis=(0, 2, 3)), rtol=0, atol=1e-12)

    flat = tmp_path / "flat.png"
    Image.new("L", (8, 8), 51).save(flat)
    mean, std = compute_mean_std([FolderSample(flat, 0)] * 3, channels=1, size=8)
    assert mean == pytest.approx((0.2,)) and std == (MIN_STD,)


def test_fashion_mnist_pngs_stream_back_to_the_idx_pixels(tmp_path):
    if not datasets.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    dataset = datasets.load_dataset("fashion-mnist", split="test")
    rows = [int(row) for label in (0, 1) for row in torch.nonzero(dataset.labels == label)[:10]]
    for row in rows:
        folder = tmp_path / f"class_{int(dataset.labels[row])}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(dataset.images[row, 0].numpy(), "L").save(folder / f"{row:05d}.png")
    data = scan_image_folder(tmp_path, val_fraction=0.0, test_fraction=0.0)
    assert (data.channels, data.image_size) == (1, 28)
    spec = dataset.spec
    split = ImageFolderSplit(
        data.splits["train"], channels=1, size=28, mean=spec.mean, std=spec.std
    )
    images, labels = next(split.batches(batch_size=20, shuffle=False, generator=None))
    assert labels.tolist() == [0] * 10 + [1] * 10
    assert torch.equal(images, datasets.preprocess_images(dataset.images[rows], spec))


def test_task_splits_relabel_cap_and_mix_the_training_classes(tmp_path):
    from supsup_deploy.data import TaskSpec

    _write_class_folders(tmp_path, {"a": 20, "b": 20, "c": 20})
    data = scan_image_folder(tmp_path, val_fraction=0.0, test_fraction=0.0)
    task = TaskSpec(4, (2, 0), "t")
    settings = {"channels": 3, "size": 8, "mean": (0.5,) * 3, "std": (0.25,) * 3, "seed": 1}
    splits = data.task_splits(task, max_train_samples=30, **settings)
    labels = [sample.label for sample in splits.train.samples]
    assert len(labels) == 30 and set(labels) == {0, 1}
    # Read in order (as the statistics refresh reads it), the classes come mixed, not sorted.
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)
    first_class = {
        sample.path.relative_to(tmp_path).parts[0]
        for sample in splits.train.samples
        if sample.label == 0
    }
    assert first_class == {"c"}
    again = data.task_splits(task, max_train_samples=30, **settings)
    assert again.train.samples == splits.train.samples


def test_default_workers_leave_small_machines_to_training(monkeypatch):
    import supsup_deploy.image_folder as image_folder

    for cpus, many, few in ((2, 0, 0), (4, 2, 0), (16, 4, 0)):
        monkeypatch.setattr(image_folder.os, "cpu_count", lambda cpus=cpus: cpus)
        assert (default_num_workers(1000), default_num_workers(10)) == (many, few)

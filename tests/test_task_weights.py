"""save_bundle / load_bundle as a pair, and a task's weights object (class names, transforms,
model) against what ``predict`` does with image files."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from supsup_deploy.bundles.format import BASIS_FILE, TASKS_FOLDER, InputSpec, task_file_name
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.validation import model_summary
from supsup_deploy.bundles.writer import TaskData, save_basis, save_bundle, save_task
from supsup_deploy.errors import ConfigError
from supsup_deploy.models import ModelConfig, build_model, masked_layers
from supsup_deploy.predictor import predict
from supsup_deploy.synthetic import write_random_bundle

CONFIG = ModelConfig(
    arch="gem_resnet18", num_classes=4, in_channels=3, stem="imagenet", width=0.25, seed=3
)
SPEC = InputSpec(size=12, channels=3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def pieces(norm_state):
    """Two random basis masks and three tasks, as in-memory pieces."""
    generator = torch.Generator().manual_seed(0)
    layers = masked_layers(build_model(CONFIG))
    basis = [[torch.rand(layer.weight_shape, generator=generator) < 0.5 for layer in layers]] * 2
    basis[1] = [~mask for mask in basis[1]]
    tables = [
        torch.eye(2)[0].repeat(len(layers), 1),
        torch.rand(len(layers), 2, generator=generator),
    ]
    tasks = [
        TaskData(
            index=index,
            name=f"t{index}",
            alpha=table,
            norm_state=norm_state,
            class_names=[f"c{index}_{k}" for k in range(CONFIG.num_classes)],
            kind="basis" if index == 0 else "alpha",
            extra={"metrics": {"test_accuracy": 0.5}},
        )
        for index, table in enumerate(tables)
    ]
    return basis, tasks


def test_save_bundle_writes_the_bytes_of_its_single_file_verbs_and_loads_back(tmp_path):
    channels = model_summary(CONFIG).norm_channels
    norm_state = {
        "norm.running_mean": torch.zeros(channels),
        "norm.running_var": torch.ones(channels),
    }
    basis, tasks = pieces(norm_state)
    out = save_bundle(
        tmp_path / "b",
        model_config=CONFIG,
        basis_masks=basis,
        input_spec=SPEC,
        tasks=tasks,
        encoding="rice",
        extra={"dataset": "fashion_mnist"},
    )
    assert out == tmp_path / "b"

    by_hand = tmp_path / "by_hand"
    (by_hand / TASKS_FOLDER).mkdir(parents=True)
    digest = save_basis(
        by_hand / BASIS_FILE,
        CONFIG,
        basis,
        SPEC,
        encoding="rice",
        extra={"dataset": "fashion_mnist"},
    )
    for task in tasks:
        path = by_hand / TASKS_FOLDER / task_file_name(task.index, task.name)
        save_task(path, **vars(task), basis_sha256=digest)
    written = sorted(path.relative_to(out) for path in out.rglob("*") if path.is_file())
    assert written == sorted(
        path.relative_to(by_hand) for path in by_hand.rglob("*") if path.is_file()
    )
    for name in written:
        assert (out / name).read_bytes() == (by_hand / name).read_bytes(), name

    bundle = load_bundle(out)
    assert (bundle.config, bundle.input, bundle.num_basis, bundle.dataset) == (
        CONFIG,
        SPEC,
        2,
        "fashion_mnist",
    )
    assert [(info.index, info.name, info.kind) for info in bundle.tasks] == [
        (0, "t0", "basis"),
        (1, "t1", "alpha"),
    ]
    for task in tasks:
        assert torch.equal(bundle.task_tensors(task.index)["alpha"], task.alpha.unsqueeze(1))
        assert bundle.task(task.index).class_names == tuple(task.class_names)
    for layer, masks in enumerate(zip(*basis, strict=True)):
        bits = np.unpackbits(bundle.packed_basis(layer).numpy(), axis=1, bitorder="little")
        expected = np.stack([mask.flatten().numpy() for mask in masks])
        assert np.array_equal(bits[:, : expected.shape[1]], expected)


def test_save_bundle_leaves_nothing_when_a_task_is_refused(tmp_path):
    basis, tasks = pieces({})
    bad = TaskData(
        index=2, name="7", alpha=tasks[1].alpha, norm_state={}, class_names=tasks[1].class_names
    )
    config = ModelConfig(**{**CONFIG.to_dict(), "norm": "group"})
    with pytest.raises(ConfigError, match="digits only"):
        save_bundle(
            tmp_path / "b",
            model_config=config,
            basis_masks=basis,
            input_spec=SPEC,
            tasks=[*tasks, bad],
        )
    assert list(tmp_path.iterdir()) == []
    save_bundle(tmp_path / "b", model_config=config, basis_masks=basis, input_spec=SPEC, tasks=[])
    with pytest.raises(ConfigError, match="already exists"):
        save_bundle(
            tmp_path / "b", model_config=config, basis_masks=basis, input_spec=SPEC, tasks=tasks
        )
    assert load_bundle(tmp_path / "b").task_entries == ()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "bundle"
    return load_bundle(write_random_bundle(path, CONFIG, SPEC, num_basis=2, alpha_tasks=2))


def image_files(folder, count=5):
    """PNG files of other sizes and modes than the bundle's input (RGB, grey, RGBA)."""
    generator = np.random.default_rng(1)
    files = []
    for number in range(count):
        mode = ("RGB", "L", "RGBA")[number % 3]
        shape = (17 + number, 9 + 2 * number) + ((len(mode),) if mode != "L" else ())
        pixels = generator.integers(0, 256, shape, dtype=np.uint8)
        files.append(folder / f"image_{number}.png")
        Image.fromarray(pixels, mode).save(files[-1])
    return files


def task_file_metadata(path):
    """The task file's JSON metadata, read straight from its safetensors header."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["supsup"])


def test_weights_carry_the_task_files_class_names_and_the_bundles_input(bundle):
    for info in bundle.tasks:
        weights = bundle.weights(info.name)
        assert weights == bundle.weights(info.index)
        assert (weights.task, weights.name, weights.input) == (info.index, info.name, SPEC)
        assert list(weights.class_names) == task_file_metadata(info.path)["class_names"]
    with pytest.raises(ConfigError, match="no task with id 9 "):
        bundle.weights(9)


def test_transforms_and_model_predict_what_bundle_predict_does(bundle, tmp_path):
    files = image_files(tmp_path)
    for task in (0, 3):
        weights = bundle.weights(task)
        preprocess = weights.transforms()
        with torch.no_grad():
            images = [Image.open(path) for path in files]
            probabilities = weights.model()(preprocess(images)).softmax(dim=1)
        predictions = predict(bundle, files, task=task)
        assert [p.class_index for p in predictions] == probabilities.argmax(dim=1).tolist()
        assert [p.class_name for p in predictions] == [
            weights.class_names[index] for index in probabilities.argmax(dim=1).tolist()
        ]
        assert [p.probability for p in predictions] == pytest.approx(
            probabilities.max(dim=1).values.tolist(), abs=1e-6
        )


def test_transforms_take_pil_images_and_uint8_tensors_alike(bundle, tmp_path):
    preprocess = bundle.weights(1).transforms()
    images = [Image.open(path) for path in image_files(tmp_path, count=3)]
    batch = preprocess(images)
    assert batch.dtype == torch.float32 and batch.shape == (3, 3, 12, 12)
    assert torch.equal(preprocess(images[0]), batch[0])
    # A uint8 tensor of the input size is only normalised: (pixel / 255 - mean) / std.
    pixels = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    mean, std = torch.tensor(SPEC.mean).view(3, 1, 1), torch.tensor(SPEC.std).view(3, 1, 1)
    assert torch.allclose(preprocess(pixels), (pixels / 255.0 - mean) / std, atol=1e-6)
    assert torch.equal(preprocess(pixels[1]), preprocess(pixels)[1])
    # Another size goes through PIL like an image file of that size.
    rgb = np.asarray(images[0].convert("RGB"))
    tensor = torch.from_numpy(rgb.transpose(2, 0, 1).copy())
    assert torch.equal(preprocess(tensor), batch[0])
    with pytest.raises(ConfigError, match="must be uint8"):
        preprocess(pixels.float())
    with pytest.raises(ConfigError, match="2 channels"):
        preprocess(torch.zeros(2, 5, 5, dtype=torch.uint8))


def test_weights_model_is_the_bundles_model(bundle):
    weights = bundle.weights("task_2")
    probe = weights.transforms()(torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(weights.model()(probe), bundle.model(2)(probe))
    assert weights.model().bundle_task == 2

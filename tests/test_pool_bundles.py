"""Format 3: int8 alpha tables, and tasks that store no statistics (a calibration pool instead).

Round trips, bit-exact weights against the page, the pool's statistics against an independent
computation, parity in both graph forms, learning over a pool on real data, and bad files.
"""

import json
import math

import numpy as np
import pytest
import spec_reference
import torch
from cli_runner import run_cli_in_process
from conftest import SMALL_RUN

from supsup_deploy.alpha_codes import dequantize_alpha, quantize_alpha
from supsup_deploy.bundles.format import (
    MAX_POOL_IMAGES,
    POOL_BATCH,
    InputSpec,
    save_sealed,
    task_file_name,
)
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import TaskData, save_bundle, save_task
from supsup_deploy.data import load_dataset
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import read_safetensors
from supsup_deploy.learn import learn_task, teach
from supsup_deploy.models import get_model_entry
from supsup_deploy.normalization import TaskBatchNorm2d
from supsup_deploy.onnx_graphs.export import TaskExporter, export_shared
from supsup_deploy.pack import pack_run
from supsup_deploy.predictor import predict
from supsup_deploy.report import bundle_report, compare_bundle_bytes
from supsup_deploy.runs import read_run_record
from supsup_deploy.synthetic import write_random_bundle
from supsup_deploy.train import RunData, evaluate, train_run
from supsup_deploy.train_config import DEFAULT_POOL, TrainConfig, default_pool

SIZE = 16
POOL_IMAGES = 24


def pool_bundle(path):
    """A random BatchNorm bundle re-saved with a calibration pool and one more task, ``pooled``:
    the last alpha task's table as int8 codes, with no statistics."""
    config = get_model_entry("gem_resnet18").config(num_classes=3, width=0.25, norm="batch")
    spec = InputSpec(size=SIZE, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    random = load_bundle(
        write_random_bundle(path.parent / "random", config, spec, num_basis=3, alpha_tasks=1)
    )
    generator = torch.Generator().manual_seed(5)
    pool = torch.randint(
        0, 256, (POOL_IMAGES, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator
    )
    codes, scale = quantize_alpha(random.task_tensors(random.tasks[-1].index)["alpha"])

    def tasks():
        for info in random.tasks:
            stored = random.stored_tensors(info.index)
            yield TaskData(
                index=info.index,
                name=info.name,
                alpha=stored.pop("alpha"),
                norm_state=stored,
                class_names=info.class_names,
                kind=info.kind,
            )
        yield TaskData(
            index=len(random.tasks),
            name="pooled",
            alpha=codes,
            alpha_scale=scale,
            norm_state={},
            class_names=["a", "b", "c"],
        )

    save_bundle(
        path,
        model_config=random.config,
        basis_masks=random.basis_masks(),
        input_spec=spec,
        tasks=tasks(),
        pool=pool,
    )
    return load_bundle(path)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    return pool_bundle(tmp_path_factory.mktemp("pool") / "bundle")


def test_int8_codes_round_trip_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    alpha = torch.randn(21, 15, generator=generator)
    alpha[3] = 0.0
    codes, scale = quantize_alpha(alpha)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert int(codes.abs().max()) == 127 and int(codes[3].abs().max()) == 0
    back = dequantize_alpha(codes, scale)
    step = scale.float().unsqueeze(1)
    assert bool(((back - alpha).abs() <= step / 2 + 1e-7).all())
    numpy = codes.numpy().astype(np.float32) * scale.numpy().astype(np.float32)[:, None]
    assert np.array_equal(back.numpy().view(np.uint32), numpy.view(np.uint32))


def test_a_pool_task_stores_only_its_table_and_serves_statistics(pooled):
    info = pooled.task("pooled")
    stored = pooled.stored_tensors("pooled")
    assert sorted(stored) == ["alpha", "alpha.scale"]
    assert (stored["alpha"].dtype, stored["alpha.scale"].dtype) == (torch.int8, torch.float16)
    assert info.file_bytes < 1024
    served = pooled.task_tensors("pooled")
    assert sorted(served) == ["alpha", "norm.running_mean", "norm.running_var"]
    assert torch.equal(served["alpha"], dequantize_alpha(stored["alpha"], stored["alpha.scale"]))
    assert served["norm.running_mean"].shape == (pooled.summary.norm_channels,)
    assert bool((served["norm.running_var"] > 0).all())
    assert pooled.pool.shape == (POOL_IMAGES, 3, SIZE, SIZE)
    report = bundle_report(pooled)
    assert report["format_version"] == 3 and report["pool_images"] == POOL_IMAGES
    row = next(task for task in report["tasks"] if task["name"] == "pooled")
    assert (row["alpha_dtype"], row["norm_dtype"], row["statistics"]) == ("int8", None, "pool")
    assert all(check["ok"] for check in compare_bundle_bytes(pooled)), compare_bundle_bytes(pooled)


def test_the_weights_are_the_pages_bit_for_bit(pooled):
    basis = read_safetensors(pooled.basis_path, max_bytes=lambda _: 1 << 30).tensors
    metadata = pooled.metadata
    stored = {key: value.numpy() for key, value in pooled.stored_tensors("pooled").items()}
    alpha = spec_reference.alpha_table(stored)
    weights = pooled.materialize("pooled")
    basis = {key: value.numpy() for key, value in basis.items()}
    for layer, entry in enumerate(metadata["layers"]):
        expected = spec_reference.effective_weight(
            pooled.config.seed,
            layer,
            entry["shape"],
            spec_reference.basis_rows(basis, metadata, layer),
            alpha[layer],
        )
        assert np.array_equal(weights[layer].numpy().view(np.uint32), expected.view(np.uint32))


def test_pool_statistics_are_the_average_of_the_batch_statistics(pooled):
    """Recomputed with hooks on a model given the task's weights: each pool batch of
    ``POOL_BATCH`` in stored order, its mean and unbiased variance per channel, averaged."""
    model = pooled.model("pooled")
    norms = [module for module in model.modules() if isinstance(module, TaskBatchNorm2d)]
    seen = {id(norm): [] for norm in norms}

    def record(norm, inputs):
        values = inputs[0]
        variance, mean = torch.var_mean(values, dim=(0, 2, 3), unbiased=True)
        seen[id(norm)].append((mean, variance))

    hooks = [norm.register_forward_pre_hook(record) for norm in norms]
    images = (pooled.pool.float() / 255 - 0.5) / 0.25
    model.train()
    with torch.no_grad():
        for batch in images.split(POOL_BATCH):
            model(batch)
    for hook in hooks:
        hook.remove()
    mean = torch.cat([torch.stack([m for m, _ in seen[id(n)]]).mean(0) for n in norms])
    variance = torch.cat([torch.stack([v for _, v in seen[id(n)]]).mean(0) for n in norms])
    served = pooled.task_tensors("pooled")
    torch.testing.assert_close(served["norm.running_mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(served["norm.running_var"], variance, rtol=1e-4, atol=1e-5)
    assert math.ceil(POOL_IMAGES / POOL_BATCH) == len(seen[id(norms[0])])


def test_parity_as_a_task_graph_and_in_the_shared_graph(pooled, tmp_path):
    report = TaskExporter(pooled).export("pooled", tmp_path / "pooled.onnx")
    assert report.argmax_equal and report.max_abs_diff <= report.tolerance
    shared = export_shared(pooled, tmp_path / "shared")
    pooled_report = next(r for r in shared if r.task == pooled.task("pooled").index)
    assert pooled_report.max_abs_diff_adapter <= pooled_report.tolerance
    assert pooled_report.max_abs_diff_inputs <= pooled_report.tolerance


def test_learning_over_a_pool_stores_no_statistics_and_reports_what_it_serves(small_run, tmp_path):
    bundle = pack_run(small_run, tmp_path / "bundle", pool=8)
    assert bundle.pool.shape == (16, 1, 28, 28) and bundle.format_version == 3
    settings = dict(
        dataset="fashion-mnist", classes="7,5", epochs=1, max_train_samples=64, device="cpu"
    )
    info = teach(bundle, name="shoes", **settings)
    assert info.file_bytes < 1024
    assert sorted(bundle.stored_tensors("shoes")) == ["alpha", "alpha.scale", "signature"]
    test = load_dataset("fashion-mnist", split="test")
    keep = (test.labels == 7) | (test.labels == 5)
    predictions = predict(bundle, test.images[keep], task="shoes")
    labels = (test.labels[keep] == 5).long().tolist()
    hits = sum(p.class_index == label for p, label in zip(predictions, labels, strict=True))
    assert hits / len(labels) == pytest.approx(info.metrics["test_accuracy"], abs=1 / len(labels))
    again = learn_task(bundle, name="shoes_again", **settings)
    path = again.save(tmp_path / "again.safetensors", index=info.index, bundle=bundle)
    stored = read_safetensors(path, max_bytes=lambda _: 1 << 20).tensors
    assert torch.equal(stored["alpha"], bundle.stored_tensors("shoes")["alpha"])


def test_pool_bundle_runs_its_tasks_from_the_cli(pooled):
    result = run_cli_in_process("inspect", str(pooled.path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pool_images"] == POOL_IMAGES
    assert "calibration pool: 24 images" in run_cli_in_process("inspect", str(pooled.path)).stdout


def _rewrite(bundle, name, tensors, **metadata):
    """Write a task file of ``bundle`` holding exactly ``tensors`` (and hash it correctly)."""
    index = bundle.task(name).index
    text = {
        "format": "supsup-task",
        "format_version": bundle.format_version,
        "index": index,
        "name": name,
        "kind": "alpha",
        "class_names": ["a", "b", "c"],
        "basis_sha256": bundle.basis_sha256,
        **metadata,
    }
    path = bundle.path / "tasks" / task_file_name(index, name)
    save_sealed(path, tensors, text)
    return path


def _stats(bundle):
    channels = bundle.summary.norm_channels
    return {"norm.running_mean": torch.zeros(channels), "norm.running_var": torch.ones(channels)}


BAD_TASKS = {
    "int8 without scales": (lambda b, s: {"alpha": s["alpha"]}, "alpha.scale"),
    "scales of a float table": (
        lambda b, s: {"alpha": s["alpha"].float(), "alpha.scale": s["alpha.scale"]},
        "alpha is torch.float32",
    ),
    "scales of the wrong shape": (
        lambda b, s: {"alpha": s["alpha"], "alpha.scale": s["alpha.scale"][:3]},
        "alpha.scale is torch.float16 [3]",
    ),
    "one statistic only": (
        lambda b, s: {**s, "norm.running_mean": _stats(b)["norm.running_mean"]},
        "norm.running_var",
    ),
    "an int16 table": (
        lambda b, s: {"alpha": s["alpha"].short(), "alpha.scale": s["alpha.scale"]},
        "alpha is torch.int16",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_format_3_task_files_are_refused_naming_the_problem(tmp_path, case):
    bundle = pool_bundle(tmp_path / "bundle")
    make, message = BAD_TASKS[case]
    path = _rewrite(bundle, "pooled", make(bundle, bundle.stored_tensors("pooled")))
    with pytest.raises(FormatError) as error:
        load_bundle(bundle.path).task("pooled")
    assert str(path) in str(error.value) and message in str(error.value), str(error.value)
    result = run_cli_in_process("inspect", str(bundle.path))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_statistics_are_required_without_a_pool(tmp_path):
    config = get_model_entry("gem_resnet18").config(num_classes=3, width=0.25, norm="batch")
    spec = InputSpec(size=SIZE, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    bundle = load_bundle(
        write_random_bundle(tmp_path / "b", config, spec, num_basis=2, alpha_tasks=1)
    )
    alpha = bundle.stored_tensors(2)["alpha"]
    _rewrite(bundle, bundle.task(2).name, {"alpha": alpha})
    with pytest.raises(FormatError, match=r"norm\.running_mean"):
        load_bundle(bundle.path).task(2)
    with pytest.raises(ConfigError, match="no calibration pool"):
        learn_task(bundle, dataset="fashion-mnist", classes="1,2", name="x", statistics="pool")


def test_a_pool_with_the_wrong_shape_is_refused(tmp_path):
    bundle = pool_bundle(tmp_path / "bundle")
    tensors = read_safetensors(bundle.basis_path, max_bytes=lambda _: 1 << 30).tensors
    metadata = bundle.metadata
    tensors["pool"] = tensors["pool"][:, :1].contiguous()
    save_sealed(bundle.basis_path, tensors, metadata)
    with pytest.raises(FormatError, match=r"pool is torch.uint8 \[24, 1, 16, 16\], expected"):
        load_bundle(bundle.path)


def test_writers_refuse_what_the_format_cannot_hold(pooled, tmp_path):
    codes, scale = quantize_alpha(torch.ones(pooled.summary.masked_layers, 3))
    with pytest.raises(ConfigError, match="needs a format 3 bundle"):
        save_task(
            tmp_path / "t.safetensors", index=9, name="t", alpha=codes, alpha_scale=scale,
            norm_state={}, class_names=["a", "b"], basis_sha256="0" * 64, version=2,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="needs its scales"):
        save_task(
            tmp_path / "t.safetensors", index=9, name="t", alpha=codes, norm_state={},
            class_names=["a", "b"], basis_sha256="0" * 64,
        )  # fmt: skip
    group = get_model_entry("gem_resnet18").config(num_classes=3, width=0.25, norm="group")
    with pytest.raises(ConfigError, match="needs norm 'batch'"):
        save_bundle(
            tmp_path / "g", model_config=group, basis_masks=pooled.basis_masks(),
            input_spec=pooled.input, tasks=[], pool=pooled.pool,
        )  # fmt: skip
    assert not (tmp_path / "g").exists()


def test_a_run_trained_with_a_pool_packs_its_alpha_tasks_under_1_kb(tmp_path):
    config = TrainConfig(**{**SMALL_RUN, "pool": 8})
    run = tmp_path / "run"
    train_run(config, run)
    assert read_run_record(run)["config"]["pool"] == 8
    assert "pool" not in TrainConfig(**SMALL_RUN).to_dict()
    bundle = pack_run(run, tmp_path / "bundle")
    assert bundle.pool.shape == (16, 1, 28, 28)
    info = bundle.task(2)
    assert sorted(bundle.stored_tensors(2)) == ["alpha", "alpha.scale", "signature"]
    assert bundle.stored_tensors(2)["alpha"].dtype == torch.int8
    assert info.file_bytes < 1024
    test = RunData.load(config).splits(2).test
    served = evaluate(bundle.model(2), test, "cpu", 64)
    assert served == pytest.approx(info.metrics["test_accuracy"], abs=1 / len(test))
    with pytest.raises(ConfigError, match="trained its alpha tasks against a pool of 8"):
        pack_run(run, tmp_path / "other", pool=4)
    with pytest.raises(ConfigError, match="--pool needs BatchNorm"):
        TrainConfig(**{**SMALL_RUN, "pool": 8, "norm": "group"})


def test_a_batchnorm_run_with_alpha_tasks_gets_a_pool_unless_told():
    assert TrainConfig().pool == DEFAULT_POOL == 32
    assert TrainConfig(protocol="random", classes_per_task=5, num_tasks=20, basis=15).pool == 32
    assert TrainConfig(basis=5).pool == 0  # no alpha tasks
    assert TrainConfig(norm="group").pool == 0
    assert TrainConfig(pool=0).pool == 0 and "pool" not in TrainConfig(pool=0).to_dict()
    assert default_pool("batch", 100, 200) == MAX_POOL_IMAGES // 100
    recorded = TrainConfig(pool=0).to_dict()
    assert TrainConfig.from_record(recorded).pool == 0  # a run from before pools has none
    assert TrainConfig.from_record(TrainConfig().to_dict()) == TrainConfig()
    assert TrainConfig.from_record({**recorded, "from_a_later_version": 1}) == TrainConfig(pool=0)

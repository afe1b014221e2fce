"""Formats 3 and 4: int8 and int4 alpha tables, grouped tables (several rows per layer), and
tasks that store no statistics (a calibration pool instead).

Round trips, bit-exact weights against the page, the pool's statistics against an independent
computation, parity in both graph forms, learning over a pool on real data, and bad files.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import spec_reference
import torch
from cli_runner import run_cli_in_process
from conftest import SMALL_RUN
from version_3 import version_3_bundle

from supsup_deploy.alpha_codes import (
    dequantize_alpha,
    encode_alpha,
    pack_nibbles,
    quantize_alpha,
    unpack_nibbles,
)
from supsup_deploy.bundles.format import (
    FORMAT_VERSION,
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
from supsup_deploy.runs import RUN_FILE, read_run_record
from supsup_deploy.synthetic import write_random_bundle
from supsup_deploy.train import RunData, evaluate, train_run
from supsup_deploy.train_config import DEFAULT_POOL, POOL_ALPHA_GROUPS, TrainConfig, default_pool

SIZE = 16
POOL_IMAGES = 24


def pool_bundle(path):
    """A random BatchNorm bundle re-saved with a calibration pool and two more tasks, with no
    statistics: ``pooled``, the last alpha task's table as int8 codes, and ``grouped``, a table
    of three rows per layer as int4 codes."""
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
    layers = random.summary.masked_layers
    nibbles, nibble_scale = encode_alpha(torch.rand(layers, 3, 3, generator=generator), "int4")

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
        yield TaskData(
            index=len(random.tasks) + 1,
            name="grouped",
            alpha=nibbles,
            alpha_scale=nibble_scale,
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


CODED_TASKS = {"pooled": ("int8", 1, (21, 1, 3)), "grouped": ("int4", 3, (95,))}
"""The coded tasks of :func:`pool_bundle`: dtype, rows per layer, stored shape (int4: 21 x 3 x 3
codes two to a byte)."""


@pytest.mark.parametrize("name", sorted(CODED_TASKS))
def test_a_pool_task_stores_only_its_table_and_serves_statistics(pooled, name):
    dtype, groups, shape = CODED_TASKS[name]
    info = pooled.task(name)
    stored = pooled.stored_tensors(name)
    assert sorted(stored) == ["alpha", "alpha.scale"]
    stored_dtype = torch.uint8 if dtype == "int4" else torch.int8
    assert (stored["alpha"].dtype, stored["alpha.scale"].dtype) == (stored_dtype, torch.float16)
    assert stored["alpha"].shape == shape
    assert stored["alpha.scale"].shape == (pooled.summary.masked_layers, groups)
    assert info.file_bytes < 1024
    served = pooled.task_tensors(name)
    assert sorted(served) == ["alpha", "norm.running_mean", "norm.running_var"]
    codes = stored["alpha"]
    if dtype == "int4":
        codes = unpack_nibbles(codes, (*stored["alpha.scale"].shape, pooled.num_basis))
        assert torch.equal(pack_nibbles(codes), stored["alpha"])
    assert torch.equal(served["alpha"], dequantize_alpha(codes, stored["alpha.scale"]))
    assert served["norm.running_mean"].shape == (pooled.summary.norm_channels,)
    assert bool((served["norm.running_var"] > 0).all())
    assert pooled.pool.shape == (POOL_IMAGES, 3, SIZE, SIZE)
    report = bundle_report(pooled)
    assert report["format_version"] == FORMAT_VERSION and report["pool_images"] == POOL_IMAGES
    row = next(task for task in report["tasks"] if task["name"] == name)
    assert (row["alpha_dtype"], row["norm_dtype"], row["statistics"]) == (dtype, None, "pool")
    assert row["alpha_groups"] == groups
    assert all(check["ok"] for check in compare_bundle_bytes(pooled)), compare_bundle_bytes(pooled)


@pytest.mark.parametrize("name", sorted(CODED_TASKS))
def test_the_weights_are_the_pages_bit_for_bit(pooled, name):
    basis = read_safetensors(pooled.basis_path, max_bytes=lambda _: 1 << 30).tensors
    metadata = pooled.metadata
    stored = {key: value.numpy() for key, value in pooled.stored_tensors(name).items()}
    alpha = spec_reference.alpha_table(stored, pooled.num_basis)
    weights = pooled.materialize(name)
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


@pytest.mark.parametrize("name", sorted(CODED_TASKS))
def test_pool_statistics_are_the_average_of_the_batch_statistics(pooled, name):
    """Recomputed with hooks on a model given the task's weights: each pool batch of
    ``POOL_BATCH`` in stored order, its mean and unbiased variance per channel, averaged."""
    model = pooled.model(name)
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
    served = pooled.task_tensors(name)
    torch.testing.assert_close(served["norm.running_mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(served["norm.running_var"], variance, rtol=1e-4, atol=1e-5)
    assert math.ceil(POOL_IMAGES / POOL_BATCH) == len(seen[id(norms[0])])


def test_parity_as_a_task_graph_and_in_the_shared_graph(pooled, tmp_path):
    shared = export_shared(pooled, tmp_path / "shared")
    for name in CODED_TASKS:
        report = TaskExporter(pooled).export(name, tmp_path / f"{name}.onnx")
        assert report.argmax_equal and report.max_abs_diff <= report.tolerance
        task_report = next(r for r in shared if r.task == pooled.task(name).index)
        assert task_report.max_abs_diff_adapter <= task_report.tolerance
        assert task_report.max_abs_diff_inputs <= task_report.tolerance


def test_learning_over_a_pool_stores_no_statistics_and_reports_what_it_serves(small_run, tmp_path):
    bundle = pack_run(small_run, tmp_path / "bundle", pool=8)
    assert bundle.pool.shape == (16, 1, 28, 28) and bundle.format_version == FORMAT_VERSION
    settings = dict(
        dataset="fashion-mnist", classes="7,5", epochs=1, max_train_samples=64, device="cpu"
    )
    info = teach(bundle, name="shoes", **settings)
    assert info.file_bytes < 1024
    stored = bundle.stored_tensors("shoes")
    assert sorted(stored) == ["alpha", "alpha.scale", "signature", "signature.scale"]
    layers, groups = bundle.summary.masked_layers, POOL_ALPHA_GROUPS
    # int4 codes, two to a byte: layers x groups x |B| = 2 codes in layers x groups bytes
    assert (stored["alpha"].dtype, stored["alpha"].shape) == (torch.uint8, (layers * groups,))
    assert stored["alpha.scale"].shape == (layers, groups)
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
    rows = {task["name"]: task for task in json.loads(result.stdout)["tasks"]}
    assert (rows["grouped"]["alpha_dtype"], rows["grouped"]["alpha_groups"]) == ("int4", 3)
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
        "alpha.scale is torch.float16 [3, 1]",
    ),
    "a table without its rows dimension": (
        lambda b, s: {"alpha": s["alpha"][:, 0], "alpha.scale": s["alpha.scale"][:, 0]},
        "expected int8 [21, 1, 3]",
    ),
    "more rows than the smallest layer's outputs": (
        lambda b, s: {
            "alpha": s["alpha"].repeat(1, 4, 1),
            "alpha.scale": s["alpha.scale"].repeat(1, 4),
        },
        "alpha has 4 rows per layer; a table has 1 to 3",
    ),
    "int4 codes with a set padding nibble": (
        lambda b, s: {
            "alpha": pack_nibbles(s["alpha"].clamp(-7, 7)) | torch.tensor(16, dtype=torch.uint8),
            "alpha.scale": s["alpha.scale"],
        },
        "unused last high nibble",
    ),
    "int4 codes of the wrong width": (
        lambda b, s: {
            "alpha": pack_nibbles(s["alpha"]).repeat(2),
            "alpha.scale": s["alpha.scale"],
        },
        "expected uint8 [32]",
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
def test_bad_coded_task_files_are_refused_naming_the_problem(tmp_path, case):
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
    assert (config.alpha_groups, config.alpha_dtype) == (POOL_ALPHA_GROUPS, "int4")
    bundle = pack_run(run, tmp_path / "bundle")
    assert bundle.pool.shape == (16, 1, 28, 28)
    info = bundle.task(2)
    stored = bundle.stored_tensors(2)
    assert sorted(stored) == ["alpha", "alpha.scale", "signature", "signature.scale"]
    assert stored["alpha"].dtype == torch.uint8  # int4 codes, two to a byte
    assert stored["alpha.scale"].shape == (bundle.summary.masked_layers, POOL_ALPHA_GROUPS)
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


def test_a_run_records_its_alpha_form_and_older_records_read_as_before(tmp_path):
    assert (TrainConfig().alpha_groups, TrainConfig().alpha_dtype) == (POOL_ALPHA_GROUPS, "int4")
    assert (TrainConfig(pool=0).alpha_groups, TrainConfig(pool=0).alpha_dtype) == (1, "float32")
    recorded = TrainConfig().to_dict()
    assert (recorded["alpha_groups"], recorded["alpha_dtype"]) == (POOL_ALPHA_GROUPS, "int4")
    older = {k: v for k, v in recorded.items() if k not in ("alpha_groups", "alpha_dtype")}
    assert TrainConfig.from_record(older) == TrainConfig(alpha_groups=1, alpha_dtype="int8")
    without_pool = {k: v for k, v in TrainConfig(pool=0).to_dict().items() if k != "alpha_dtype"}
    assert TrainConfig.from_record(without_pool).alpha_dtype == "float32"
    for bad, message in [
        ({"alpha_groups": 0}, "--alpha-groups must be at least 1"),
        ({"alpha_dtype": "int2"}, "--alpha-dtype must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**bad)


def test_a_run_from_before_alpha_forms_resumes_with_its_own_form(tmp_path):
    config = TrainConfig(**{**SMALL_RUN, "num_tasks": 1, "basis": 1})
    run = tmp_path / "run"
    train_run(config, run)
    record = json.loads((run / RUN_FILE).read_text())
    for key in ("alpha_groups", "alpha_dtype"):
        del record["config"][key]
    (run / RUN_FILE).write_text(json.dumps(record))
    train_run(config, run, resume=True)  # pool 0: one float32 row, as the record implies
    with pytest.raises(ConfigError, match="alpha_groups: 1 -> 2"):
        train_run(dataclasses.replace(config, alpha_groups=2), run, resume=True)


def test_a_run_refuses_more_alpha_rows_than_its_narrowest_layer_before_training(tmp_path):
    config = TrainConfig(**{**SMALL_RUN, "alpha_groups": 10_000})
    with pytest.raises(ConfigError, match=r"alpha groups must be an integer from 1 to \d+"):
        train_run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_format_3_bundles_still_load_and_learn_one_int8_row_per_layer(small_run, tmp_path):
    bundle = pack_run(small_run, tmp_path / "bundle", pool=8)
    old = load_bundle(version_3_bundle(bundle.path, tmp_path / "version_3"))
    assert old.format_version == 3
    for info in bundle.tasks:
        assert old.stored_tensors(info.index)["alpha"].dim() == 2
        assert torch.equal(
            old.task_tensors(info.index)["alpha"], bundle.task_tensors(info.index)["alpha"]
        )
        for new, former in zip(
            bundle.materialize(info.index), old.materialize(info.index), strict=True
        ):
            assert torch.equal(new, former)
    settings = dict(
        dataset="fashion-mnist", classes="7,5", epochs=1, max_train_samples=64, device="cpu"
    )
    with pytest.raises(ConfigError, match="int4 alpha tables need format 4"):
        learn_task(old, name="shoes", alpha_dtype="int4", **settings)
    with pytest.raises(ConfigError, match="several alpha rows per layer need format 4"):
        learn_task(old, name="shoes", alpha_groups=2, **settings)
    teach(old, name="shoes", **settings)
    stored = old.stored_tensors("shoes")
    assert (stored["alpha"].dtype, stored["alpha"].shape) == (
        torch.int8,
        (old.summary.masked_layers, old.num_basis),
    )
    assert load_bundle(old.path).task("shoes").file_bytes < 1024


def test_learning_refuses_more_rows_than_the_smallest_layer_has_outputs(pooled):
    with pytest.raises(ConfigError, match="alpha groups must be an integer from 1 to 3"):
        learn_task(pooled, dataset="fashion-mnist", classes="1,2", name="x", alpha_groups=4)

"""The shared graph: one ONNX graph for every task, each task fed as inputs or as an adapter."""

import re
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from cli_runner import run_cli

from supsup_deploy.alpha_codes import encode_alpha
from supsup_deploy.bundles.format import InputSpec, task_file_name
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import save_task
from supsup_deploy.errors import FormatError
from supsup_deploy.models import get_model_entry
from supsup_deploy.onnx_graphs.adapters import adapter_bytes, load_adapter
from supsup_deploy.onnx_graphs.export import export_adapter, export_shared
from supsup_deploy.onnx_graphs.format import MODEL_FILE
from supsup_deploy.onnx_graphs.parity import ParityError
from supsup_deploy.onnx_graphs.sessions import SharedGraph, run_onnx
from supsup_deploy.onnx_graphs.shared_graph import (
    build_shared_graph,
    code_planes,
    task_feed,
    task_inputs,
)
from supsup_deploy.pack import add_task, pack_run
from supsup_deploy.runtime import Runner
from supsup_deploy.synthetic import write_random_bundle

SIZE = 16


def random_bundle(path, *, norm="batch", num_basis=3, alpha_tasks=1, basis_tasks=True):
    config = get_model_entry("gem_resnet18").config(num_classes=3, width=0.25, norm=norm)
    spec = InputSpec(size=SIZE, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    write_random_bundle(
        path, config, spec, num_basis=num_basis, alpha_tasks=alpha_tasks, basis_tasks=basis_tasks
    )
    return load_bundle(path)


def images(count=6, seed=1):
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def rewrite_task(bundle, info, *, alpha=None, index=None, name=None, folder=None, alpha_scale=None):
    """Save a task again (optionally as another task), keeping its other tensors."""
    tensors = bundle.task_tensors(info.index)
    table = tensors.pop("alpha") if alpha is None else alpha
    tensors.pop("alpha", None)
    name = name or info.name
    index = info.index if index is None else index
    path = (folder or info.path.parent) / task_file_name(index, name)
    save_task(
        path,
        index=index,
        name=name,
        alpha=table,
        norm_state=tensors,
        class_names=list(info.class_names),
        basis_sha256=bundle.basis_sha256,
        kind=info.kind,
        alpha_scale=alpha_scale,
    )
    return path


def graph_weights(bundle, *tasks):
    """The weights the shared graph computes for each task (one list per task; the list itself
    for one task), read from the graph's own nodes, each task fed as :func:`task_feed` feeds it."""
    model = build_shared_graph(bundle)
    names = [f"shared.weight.{layer:03d}" for layer in range(bundle.summary.masked_layers)]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    inputs = task_inputs(bundle)
    weights = []
    for task in tasks:
        feed = task_feed(bundle, task, inputs)
        outputs = session.run(names, {"input": images(1).numpy(), **feed})
        weights.append([torch.from_numpy(values) for values in outputs])
    return weights[0] if len(tasks) == 1 else weights


@pytest.mark.parametrize("num_basis", [3, 9])
def test_graph_weights_are_bit_exact_to_materialize(tmp_path, num_basis):
    bundle = random_bundle(tmp_path / "b", num_basis=num_basis, basis_tasks=False)
    task = bundle.tasks[0].index
    for got, expected in zip(graph_weights(bundle, task), bundle.materialize(task), strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_sixteen_basis_masks_use_two_planes_within_tolerance(tmp_path):
    bundle = random_bundle(tmp_path / "b", num_basis=16, basis_tasks=False)
    assert [plane.dtype.itemsize for plane in code_planes(16)] == [2, 1]
    task = bundle.tasks[0].index
    for got, expected in zip(graph_weights(bundle, task), bundle.materialize(task), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_basis, itemsize", [(1, 1), (7, 1), (8, 2), (15, 2)])
def test_codes_take_one_byte_to_seven_basis_masks_then_two(num_basis, itemsize):
    planes = code_planes(num_basis)
    assert len(planes) == 1 and planes[0].dtype.itemsize == itemsize


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_export_writes_graph_and_adapters_with_parity(tmp_path, norm):
    bundle = random_bundle(tmp_path / "b", norm=norm)
    reports = export_shared(bundle, tmp_path / "out")
    assert [report.task for report in reports] == [info.index for info in bundle.tasks]
    assert all(r.max_abs_diff_inputs <= 1e-4 and r.max_abs_diff_adapter <= 1e-4 for r in reports)
    onnx.checker.check_model(str(tmp_path / "out" / MODEL_FILE), full_check=True)
    model = onnx.load(str(tmp_path / "out" / MODEL_FILE))
    assert model.opset_import[0].version == 18
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"}
    assert ("BatchNormalization" in ops) == (norm == "batch")
    inputs = {value.name for value in model.graph.input}
    expected = {"input", *bundle.task_tensors(bundle.tasks[0].index)}
    assert inputs == expected
    codes = [i for i in model.graph.initializer if i.name.startswith("shared.codes.")]
    assert {i.data_type for i in codes} == {onnx.TensorProto.UINT8}
    assert sum(len(i.raw_data) for i in codes) == bundle.summary.masked_weights
    shared = SharedGraph(tmp_path / "out" / MODEL_FILE)
    probe = images()
    for info in bundle.tasks:
        expected_logits = bundle.model(info.index)(probe).detach().numpy()
        adapter = load_adapter(
            tmp_path / "out" / "tasks" / f"{info.name}.onnx_adapter", shared.inputs
        )
        assert adapter.task == info.index
        for got in (
            shared.run(probe, feed=shared.feed(bundle, info.index)),
            shared.run(probe, adapter=adapter),
        ):
            np.testing.assert_allclose(got, expected_logits, atol=1e-4, rtol=0)
            assert (got.argmax(1) == expected_logits.argmax(1)).all()


def grouped_alpha(bundle, groups, seed):
    """A seeded ``[L, groups, |B|]`` table: the first task's rows, each group moved apart."""
    base = bundle.task_tensors(bundle.tasks[0].index)["alpha"]
    noise = torch.randn(
        base.shape[0], groups, base.shape[2], generator=torch.Generator().manual_seed(seed)
    )
    return (base.expand(-1, groups, -1) + 0.2 * noise).contiguous()


def add_grouped_task(bundle, tmp_path, index, name, groups, *, dtype="float32", seed=0):
    """Install a task with ``groups`` alpha rows per layer, stored as ``dtype``, via add-task."""
    alpha, scale = encode_alpha(grouped_alpha(bundle, groups, seed), dtype)
    shipped = rewrite_task(
        bundle,
        bundle.tasks[0],
        alpha=alpha,
        alpha_scale=scale,
        index=index,
        name=name,
        folder=tmp_path,
    )
    return add_task(bundle.path, shipped)


def grouped_bundle(tmp_path, groups=((2, "float32"), (2, "int4"))):
    """Two ungrouped alpha tasks (0, 1) and one task per ``(G, dtype)`` (10, 11, ...)."""
    bundle = random_bundle(tmp_path / "b", basis_tasks=False, alpha_tasks=2)
    for number, (count, dtype) in enumerate(groups):
        bundle = add_grouped_task(
            bundle, tmp_path, 10 + number, f"g{count}_{dtype}", count, dtype=dtype, seed=number
        )
    return bundle


def test_grouped_tasks_graph_weights_are_bit_exact_to_materialize(tmp_path):
    # G = 1, 2 (float32 and int4 codes) and 3: the graph takes lcm = 6 rows per layer, more than
    # the classifier's 3 outputs, so some of its groups hold no channel
    bundle = grouped_bundle(tmp_path, groups=((2, "float32"), (2, "int4"), (3, "float16")))
    counts = {
        info.index: bundle.task_tensors(info.index)["alpha"].shape[1] for info in bundle.tasks
    }
    assert counts == {0: 1, 1: 1, 10: 2, 11: 2, 12: 3}
    layers, num_basis = bundle.summary.masked_layers, bundle.num_basis
    assert {spec.name: spec.shape for spec in task_inputs(bundle)}["alpha"] == (
        layers,
        6,
        num_basis,
    )
    tasks = [info.index for info in bundle.tasks]
    for task, weights in zip(tasks, graph_weights(bundle, *tasks), strict=True):
        for got, expected in zip(weights, bundle.materialize(task), strict=True):
            assert got.dtype == torch.float32
            assert torch.equal(got, expected), task


def test_grouped_tasks_over_two_code_planes_within_tolerance(tmp_path):
    bundle = random_bundle(tmp_path / "b", num_basis=16, basis_tasks=False, alpha_tasks=1)
    bundle = add_grouped_task(bundle, tmp_path, 10, "pair", 2)
    tasks = [info.index for info in bundle.tasks]
    for task, weights in zip(tasks, graph_weights(bundle, *tasks), strict=True):
        for got, expected in zip(weights, bundle.materialize(task), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_grouped_tasks_export_with_parity_fed_and_as_adapters(tmp_path):
    bundle = grouped_bundle(tmp_path)
    reports = export_shared(bundle, tmp_path / "out")
    assert [report.task for report in reports] == [0, 1, 10, 11]
    assert all(r.max_abs_diff_inputs <= 1e-4 and r.max_abs_diff_adapter <= 1e-4 for r in reports)
    onnx.checker.check_model(str(tmp_path / "out" / MODEL_FILE), full_check=True)
    model = onnx.load(str(tmp_path / "out" / MODEL_FILE))
    codes = [i for i in model.graph.initializer if i.name.startswith("shared.codes.")]
    assert {i.data_type for i in codes} == {onnx.TensorProto.UINT8}
    assert sum(len(i.raw_data) for i in codes) == bundle.summary.masked_weights
    shared = SharedGraph(tmp_path / "out" / MODEL_FILE)
    alpha = {spec.name: spec for spec in shared.inputs}["alpha"]
    assert alpha.shape == (bundle.summary.masked_layers, 2, bundle.num_basis)
    probe = images()
    for info in bundle.tasks:
        expected_logits = bundle.model(info.index)(probe).detach().numpy()
        adapter = load_adapter(
            tmp_path / "out" / "tasks" / f"{info.name}.onnx_adapter", shared.inputs
        )
        assert adapter.tensors["alpha"].shape == alpha.shape
        for got in (
            shared.run(probe, feed=shared.feed(bundle, info.index)),
            shared.run(probe, adapter=adapter),
            run_onnx(shared.specialize(adapter), probe),
        ):
            np.testing.assert_allclose(got, expected_logits, atol=1e-4, rtol=0)
            assert (got.argmax(1) == expected_logits.argmax(1)).all()
    differing = [shared.run(probe, feed=shared.feed(bundle, task)) for task in (0, 10, 11)]
    assert not np.allclose(differing[0], differing[1], atol=1e-4)
    assert not np.allclose(differing[1], differing[2], atol=1e-6)


def test_task_whose_groups_do_not_divide_the_graphs_is_refused(tmp_path):
    bundle = grouped_bundle(tmp_path, groups=((2, "float32"),))
    export_shared(bundle, tmp_path / "out")
    graph = tmp_path / "out" / MODEL_FILE
    bundle = add_grouped_task(bundle, tmp_path, 20, "late_one", 1, seed=5)
    bundle = add_grouped_task(bundle, tmp_path, 21, "late_three", 3, seed=6)
    report = export_adapter(bundle, "late_one", tmp_path / "late_one.onnx_adapter", graph=graph)
    assert report.task == 20 and report.max_abs_diff_adapter <= 1e-4
    message = (
        "alpha has 3 rows per layer but the shared graph takes 2, not a multiple; "
        "export the shared graph again"
    )
    with pytest.raises(FormatError, match=re.escape(message)) as caught:
        export_adapter(bundle, "late_three", tmp_path / "late_three.onnx_adapter", graph=graph)
    assert "\n" not in str(caught.value)
    assert str(bundle.task("late_three").path) in str(caught.value)
    assert not (tmp_path / "late_three.onnx_adapter").exists()
    with pytest.raises(FormatError, match=re.escape(message)):
        SharedGraph(graph).feed(bundle, 21)


def test_export_is_deterministic(tmp_path):
    bundle = random_bundle(tmp_path / "b")
    export_shared(bundle, tmp_path / "one")
    export_shared(bundle, tmp_path / "two")
    for relative in [MODEL_FILE] + [f"tasks/{info.name}.onnx_adapter" for info in bundle.tasks]:
        assert (tmp_path / "one" / relative).read_bytes() == (
            tmp_path / "two" / relative
        ).read_bytes()


def test_float16_alpha_is_fed_as_float16(tmp_path):
    bundle = random_bundle(tmp_path / "b", basis_tasks=False, alpha_tasks=2)
    for info in bundle.tasks:
        rewrite_task(bundle, info, alpha=bundle.task_tensors(info.index)["alpha"].half())
    bundle = load_bundle(tmp_path / "b")
    export_shared(bundle, tmp_path / "out")
    shared = SharedGraph(tmp_path / "out" / MODEL_FILE)
    assert {spec.name: spec.dtype for spec in shared.inputs}["alpha"] == "float16"
    adapter = load_adapter(tmp_path / "out" / "tasks" / "task_0.onnx_adapter", shared.inputs)
    assert adapter.tensors["alpha"].dtype == np.float16
    assert np.array_equal(adapter.tensors["alpha"], bundle.task_tensors(0)["alpha"].numpy())


def test_float32_task_is_refused_by_a_float16_graph(tmp_path):
    bundle = random_bundle(tmp_path / "b", basis_tasks=False, alpha_tasks=1)
    first = bundle.tasks[0]
    alpha = bundle.task_tensors(first.index)["alpha"]
    rewrite_task(bundle, first, alpha=alpha.half())
    export_shared(load_bundle(tmp_path / "b"), tmp_path / "out")
    shipped = rewrite_task(bundle, first, alpha=alpha, index=5, name="wide", folder=tmp_path)
    bundle = add_task(tmp_path / "b", shipped)
    with pytest.raises(FormatError, match="alpha is float32 but the shared graph takes float16"):
        export_adapter(
            bundle, "wide", tmp_path / "wide.onnx_adapter", graph=tmp_path / "out" / MODEL_FILE
        )
    assert not (tmp_path / "wide.onnx_adapter").exists()


def test_mixed_alpha_dtypes_feed_float32_exactly(tmp_path):
    bundle = random_bundle(tmp_path / "b", basis_tasks=False, alpha_tasks=2)
    rewrite_task(bundle, bundle.tasks[0], alpha=bundle.task_tensors(0)["alpha"].half())
    bundle = load_bundle(tmp_path / "b")
    reports = export_shared(bundle, tmp_path / "out")
    assert len(reports) == 2
    shared = SharedGraph(tmp_path / "out" / MODEL_FILE)
    assert {spec.name: spec.dtype for spec in shared.inputs}["alpha"] == "float32"


def test_adapter_round_trip(tmp_path):
    bundle = random_bundle(tmp_path / "b")
    export_shared(bundle, tmp_path / "out")
    shared = SharedGraph(tmp_path / "out" / MODEL_FILE)
    for info in bundle.tasks:
        path = tmp_path / "out" / "tasks" / f"{info.name}.onnx_adapter"
        adapter = load_adapter(path, shared.inputs)
        tensors = bundle.task_tensors(info.index)
        assert set(adapter.tensors) == set(tensors)
        for name, values in tensors.items():
            assert np.array_equal(adapter.tensors[name], values.numpy())
        assert path.read_bytes() == adapter_bytes(shared.feed(bundle, info.index), task=info.index)


def test_task_added_after_export_runs_from_its_adapter_alone(tmp_path):
    bundle = random_bundle(tmp_path / "b", basis_tasks=False, alpha_tasks=1)
    export_shared(bundle, tmp_path / "out")
    first = bundle.tasks[0]
    alpha = bundle.task_tensors(first.index)["alpha"].flip(-1).contiguous()
    shipped = rewrite_task(bundle, first, alpha=alpha, index=7, name="late", folder=tmp_path)
    bundle = add_task(tmp_path / "b", shipped)
    graph = tmp_path / "out" / MODEL_FILE
    before = graph.read_bytes()
    report = export_adapter(bundle, "late", tmp_path / "late.onnx_adapter", graph=graph)
    assert report.task == 7 and graph.read_bytes() == before
    shared = SharedGraph(graph)
    adapter = load_adapter(tmp_path / "late.onnx_adapter", shared.inputs)
    probe = images()
    expected = bundle.model("late")(probe).detach().numpy()
    got = shared.run(probe, adapter=adapter)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    default = shared.run(probe)
    assert not np.allclose(default, expected, atol=1e-4)


def bad_adapters(tmp_path, bundle, shared):
    good = (tmp_path / "out" / "tasks" / "task_0.onnx_adapter").read_bytes()
    feed = shared.feed(bundle, 0)
    half = {name: values.astype(np.float16) for name, values in feed.items()}
    wrong_shape = {**feed, "alpha": feed["alpha"][..., :1].copy()}
    non_finite = {**feed, "alpha": np.full_like(feed["alpha"], np.nan)}
    return {
        "garbage": (b"not an adapter" * 8, "not an ONNX Runtime adapter"),
        "truncated": (good[: len(good) // 2], "not an ONNX Runtime adapter"),
        "dtype": (adapter_bytes(half, task=0), "the shared graph takes float32"),
        "shape": (adapter_bytes(wrong_shape, task=0), "the shared graph takes float32"),
        "names": (adapter_bytes({"alpha": feed["alpha"]}, task=0), "adapter holds ['alpha']"),
        "nan": (adapter_bytes(non_finite, task=0), "non-finite"),
    }


def test_bad_adapter_files_give_one_line_errors(tmp_path):
    bundle = random_bundle(tmp_path / "b")
    export_shared(bundle, tmp_path / "out")
    shared = SharedGraph(tmp_path / "out" / MODEL_FILE)
    for kind, (data, message) in bad_adapters(tmp_path, bundle, shared).items():
        path = tmp_path / f"{kind}.onnx_adapter"
        path.write_bytes(data)
        with pytest.raises(FormatError, match=re.escape(message)) as caught:
            load_adapter(path, shared.inputs)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value), kind
    with pytest.raises(FormatError, match="no such adapter"):
        load_adapter(tmp_path / "missing.onnx_adapter", shared.inputs)


def test_runner_uses_adapters_beside_the_graph_and_checks_them(tmp_path):
    bundle = random_bundle(tmp_path / "b")
    export_shared(bundle, tmp_path / "out")
    probe = images()
    runner = Runner(bundle, runtime="onnx", onnx_path=tmp_path / "out" / MODEL_FILE)
    for info in bundle.tasks:
        expected = bundle.model(info.index)(probe).detach()
        torch.testing.assert_close(runner.logits(info.index, probe), expected, atol=1e-4, rtol=0)
    tasks = tmp_path / "out" / "tasks"
    (tasks / "task_1.onnx_adapter").write_bytes((tasks / "task_2.onnx_adapter").read_bytes())
    runner = Runner(bundle, runtime="onnx", onnx_path=tmp_path / "out" / MODEL_FILE)
    with pytest.raises(FormatError, match="holds task 2, not task 1"):
        runner.logits(1, probe)
    (tasks / "task_1.onnx_adapter").unlink()
    torch.testing.assert_close(
        runner.logits(1, probe), bundle.model(1)(probe).detach(), atol=1e-4, rtol=0
    )


def test_graph_of_another_bundle_is_refused(tmp_path):
    bundle = random_bundle(tmp_path / "b")
    other = random_bundle(tmp_path / "other", norm="group")
    export_shared(other, tmp_path / "out")
    runner = Runner(bundle, runtime="onnx", onnx_path=tmp_path / "out" / MODEL_FILE)
    with pytest.raises(FormatError, match="another bundle"):
        runner.logits(0, images())
    with pytest.raises(FormatError, match="another bundle"):
        export_adapter(bundle, 0, tmp_path / "x.onnx_adapter", graph=tmp_path / "out" / MODEL_FILE)
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    from supsup_deploy.onnx_graphs import targets

    bundle = random_bundle(tmp_path / "b")
    strict = replace(targets.export_target("shared"), tolerances={"float32": -1.0})
    monkeypatch.setitem(targets.EXPORT_TARGETS, "shared", strict)
    with pytest.raises(ParityError, match="shared graph parity failed for task 0"):
        export_shared(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trained_bundles(small_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    bundles = {}
    for encoding, norm_dtype in (("packed", "float32"), ("rice", "float16"), ("sparse", "float32")):
        bundles[encoding] = pack_run(
            small_run, folder / encoding, mask_encoding=encoding, norm_dtype=norm_dtype
        )
    return folder, bundles


def test_trained_bundles_in_every_mask_encoding_export_with_parity(trained_bundles):
    folder, bundles = trained_bundles
    graphs = {}
    for encoding, bundle in bundles.items():
        reports = export_shared(bundle, folder / f"{encoding}-shared")
        assert {report.probe for report in reports} == {"fashion-mnist test images"}
        assert len(reports) == len(bundle.tasks)
        graphs[encoding] = onnx.load(str(folder / f"{encoding}-shared" / MODEL_FILE))
    codes = {
        encoding: [
            bytes(i.raw_data) for i in graph.graph.initializer if i.name.startswith("shared.codes.")
        ]
        for encoding, graph in graphs.items()
    }
    assert codes["packed"] == codes["rice"] == codes["sparse"]
    statistics = {spec["name"]: spec["dtype"] for spec in _task_inputs(graphs["rice"])}
    assert statistics["norm.running_mean"] == "float16"


def _task_inputs(model):
    import json

    metadata = {prop.key: prop.value for prop in model.metadata_props}
    return json.loads(metadata["supsup.task_inputs"])


def test_cli_export_shared_infer_and_adapter(trained_bundles, tmp_path):
    bundles = trained_bundles[1]
    bundle_path = str(bundles["packed"].path)
    out = tmp_path / "shared"
    result = run_cli("export", bundle_path, "--shared", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    graph = str(out / MODEL_FILE)
    task = bundles["packed"].tasks[-1]
    result = run_cli(
        "infer", bundle_path, "--runtime", "onnx", "--onnx", graph, "--task", str(task.index),
        "--dataset-split", "test", "--limit", "16", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    torch_result = run_cli(
        "infer", bundle_path, "--task", str(task.index), "--dataset-split", "test",
        "--limit", "16", "--json",
    )  # fmt: skip
    import json

    onnx_rows = json.loads(result.stdout)["predictions"]
    torch_rows = json.loads(torch_result.stdout)["predictions"]
    assert [r["class_index"] for r in onnx_rows] == [r["class_index"] for r in torch_rows]
    result = run_cli(
        "infer", bundle_path, "--runtime", "onnx", "--onnx", graph, "--task", "auto",
        "--dataset-split", "test", "--limit", "16", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtime"] == "onnxruntime:CPUExecutionProvider"
    adapter = tmp_path / "again.onnx_adapter"
    result = run_cli(
        "export", bundle_path, "--task", task.name, "--adapter", str(adapter), "--graph", graph
    )
    assert result.returncode == 0, result.stderr
    assert adapter.read_bytes() == (out / "tasks" / f"{task.name}.onnx_adapter").read_bytes()
    (out / "tasks" / f"{task.name}.onnx_adapter").write_bytes(b"broken")
    result = run_cli(
        "infer", bundle_path, "--runtime", "onnx", "--onnx", graph, "--task", str(task.index),
        "--dataset-split", "test", "--limit", "4",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not an ONNX Runtime adapter" in result.stderr
    assert "Traceback" not in result.stderr

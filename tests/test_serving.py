"""Serving from the shared graph: specialised sessions and the predictor's hot-task cache."""

import json
import threading

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from PIL import Image

from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.hot_tasks import HotRule, HotTasks
from supsup_deploy.models import get_model_entry
from supsup_deploy.onnx_graphs.adapters import load_adapter
from supsup_deploy.onnx_graphs.export import TaskExporter, export_shared
from supsup_deploy.onnx_graphs.format import MODEL_FILE
from supsup_deploy.onnx_graphs.sessions import SharedGraph, onnx_session, run_onnx
from supsup_deploy.predictor import Predictor, predict
from supsup_deploy.runtime import load_images
from supsup_deploy.synthetic import write_random_bundle

SIZE = 16
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A quarter-width BatchNorm bundle of 4 tasks, its shared export and each dense graph."""
    root = tmp_path_factory.mktemp("served")
    config = get_model_entry("gem_resnet18").config(num_classes=3, width=0.25)
    spec = InputSpec(size=SIZE, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    write_random_bundle(root / "b", config, spec, num_basis=3, alpha_tasks=1)
    bundle = load_bundle(root / "b")
    export_shared(bundle, root / "shared")
    exporter = TaskExporter(bundle, exporter="legacy")
    dense = {}
    for info in bundle.tasks:
        exporter.export(info.index, root / f"task_{info.index}.onnx")
        dense[info.index] = onnx_session(root / f"task_{info.index}.onnx")
    return bundle, root, dense


def images(count=4, seed=1):
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def assert_dense(got, dense_session, probe):
    expected = run_onnx(dense_session, probe)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_specialized_session_matches_dense_graph(served):
    bundle, root, dense = served
    shared = SharedGraph(root / "shared" / MODEL_FILE)
    probe = images()
    for info in bundle.tasks:
        session = shared.specialize(bundle, info.name)
        assert [value.name for value in session.get_inputs()] == ["input"]
        assert_dense(run_onnx(session, probe), dense[info.index], probe)
        adapter = load_adapter(
            root / "shared" / "tasks" / f"{info.name}.onnx_adapter", shared.inputs
        )
        assert_dense(run_onnx(shared.specialize(adapter), probe), dense[info.index], probe)
    assert sorted(path.name for path in (root / "shared").rglob("*")) == sorted(
        ["tasks", MODEL_FILE] + [f"{info.name}.onnx_adapter" for info in bundle.tasks]
    )


def test_specialize_refuses_another_basis_and_bad_tensors(served, tmp_path):
    bundle, root, _ = served
    shared = SharedGraph(root / "shared" / MODEL_FILE)
    config = get_model_entry("gem_resnet18").config(num_classes=3, width=0.25, seed=7)
    spec = InputSpec(size=SIZE, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    write_random_bundle(tmp_path / "other", config, spec, num_basis=3, alpha_tasks=1)
    with pytest.raises(FormatError, match="exported from another bundle"):
        shared.specialize(load_bundle(tmp_path / "other"), 0)
    tensors = shared.feed(bundle, 0)
    tensors["alpha"] = tensors["alpha"][..., :2]
    with pytest.raises(FormatError, match="alpha must be float32"):
        shared.specialize_tensors(tensors)


def test_in_memory_predictor_serves_a_concurrent_stream_at_parity(served):
    bundle, _, dense = served
    tasks = [info.index for info in bundle.tasks]
    rng = np.random.default_rng(0)
    stream = [(int(rng.choice(tasks)), int(rng.integers(1, 4)), seed) for seed in range(48)]
    failures = []
    with Predictor(bundle, hot_tasks=2, hot_after=2, window=8) as predictor:

        def serve(requests):
            for task, count, seed in requests:
                probe = images(count, seed)
                try:
                    assert_dense(predictor.run(task, probe), dense[task], probe)
                except AssertionError as error:
                    failures.append((task, error))

        threads = [threading.Thread(target=serve, args=(stream[n::4],)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        predictor.wait()
        assert predictor.hot.built >= 2 and len(predictor.hot.hot) <= 2
        assert not predictor.hot.failures
        serve(stream[:8])
    assert not failures


def test_exported_predictor_promotes_on_the_second_request_in_the_window(served):
    bundle, root, dense = served
    probe = images()
    with Predictor(
        bundle, onnx_path=root / "shared" / MODEL_FILE, hot_tasks=1, window=2, background=False
    ) as predictor:
        first, second = (info.index for info in bundle.tasks[:2])
        assert predictor.hot.session(first) is None
        assert predictor.hot.session(second) is None
        assert predictor.hot.session(first) is None
        assert predictor.hot.hot == ()
        assert predictor.hot.session(first) is None
        assert predictor.hot.hot == (first,)
        assert_dense(predictor.run(first, probe), dense[first], probe)
        predictor.run(second, probe)
        assert predictor.hot.hot == (first,)
        predictor.run(second, probe)
        assert predictor.hot.hot == (second,)
        assert_dense(predictor.run(second, probe), dense[second], probe)
        assert predictor.provider == "onnxruntime:CPUExecutionProvider"


def test_hot_tasks_stay_within_capacity_and_keep_failures():
    built = []

    def specialize(task):
        if task == 9:
            raise RuntimeError("no session")
        built.append(task)
        return f"session {task}"

    hot = HotTasks(specialize, HotRule(2, hot_after=1, window=4), background=True)
    for task in [1, 2, 1, 3, 9, 3, 1]:
        hot.session(task)
        hot.wait()
    assert hot.hot == (3, 1) and built == [1, 2, 3]
    assert hot.session(1) == "session 1"
    assert hot.failures == {9: "no session"}
    hot.close()
    assert hot.hot == ()


@pytest.mark.parametrize("capacity, after, window", [(-1, 2, 4), (1, 0, 4), (1, 5, 4)])
def test_hot_rule_refuses_bad_settings(capacity, after, window):
    with pytest.raises(ConfigError):
        HotRule(capacity, after, window)


def test_hot_tasks_need_a_shared_graph_and_onnx_runtime(served):
    bundle, root, _ = served
    with pytest.raises(ConfigError, match="not a per-task graph"):
        Predictor(bundle, onnx_path=root / "task_0.onnx", hot_tasks=2)
    with pytest.raises(ConfigError, match="use the onnx runtime"):
        Predictor(bundle, runtime="torch", hot_tasks=2)


def test_predict_and_infer_use_hot_tasks(served):
    bundle, root, dense = served
    pixels = torch.randint(0, 256, (6, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2))
    pixels = pixels.to(torch.uint8)
    info = bundle.tasks[1]
    got = predict(bundle, pixels, task=info.index, runtime="onnx", hot_tasks=1, batch_size=2)
    probe = bundle.weights(info.index).transforms()(pixels)
    expected = run_onnx(dense[info.index], probe).argmax(1)
    assert [p.class_index for p in got] == expected.tolist()
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    for number in range(4):
        Image.new("RGB", (SIZE, SIZE), color=(60 * number, 40, 200)).save(folder / f"{number}.png")
    shared = str(root / "shared" / MODEL_FILE)
    command = ["infer", str(root / "b"), str(folder), "--task", str(info.index), "--json"]
    hot = run_cli(*command, "--onnx", shared, "--hot-tasks", "2", "--batch-size", "1")
    assert hot.returncode == 0, hot.stderr
    files = sorted(folder.glob("*.png"))
    expected = run_onnx(dense[info.index], load_images(files, bundle)).argmax(1)
    assert [p["class_index"] for p in json.loads(hot.stdout)["predictions"]] == expected.tolist()
    refused = run_cli(*command, "--hot-tasks", "-1")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "hot tasks must be at least 0" in refused.stderr

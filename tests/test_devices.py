"""``--device`` is parsed in one place: auto, cpu, cuda, cuda:N; CUDA keeps its index in ONNX
Runtime. CUDA's presence is simulated where this machine has none (the parsing is under test,
not the GPU; tests marked gpu run the real thing)."""

import onnxruntime
import pytest
import torch

from supsup_deploy.devices import onnx_providers, resolve_device
from supsup_deploy.errors import ConfigError


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_cpu_without_cuda(no_gpu):
    assert resolve_device("auto") == "cpu"
    assert resolve_device(" CPU ") == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "auto"])
def test_cuda_without_a_gpu_is_refused_except_auto(no_gpu, name):
    if name == "auto":
        assert resolve_device(name) == "cpu"
        return
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "nvidia", "cuda:-1", ""])
def test_unknown_names(name):
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(name)


def test_cuda_names_with_gpus(two_gpus):
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="2 GPU"):
        resolve_device("cuda:2")


def test_onnx_runtime_keeps_the_gpu_index(two_gpus, monkeypatch):
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert onnx_providers("cuda:1") == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert onnx_providers("cuda")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]


def test_onnx_runtime_without_cuda_provider(two_gpus, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        onnx_providers("cuda:0")


@pytest.mark.gpu
def test_real_cuda_session_runs_on_the_named_gpu(tmp_path):
    from supsup_deploy.onnx_graphs.sessions import onnx_session

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "linear.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3),), str(path), dynamo=False)
    session = onnx_session(path, device="cuda:0")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    assert session.get_provider_options()["CUDAExecutionProvider"]["device_id"] == "0"

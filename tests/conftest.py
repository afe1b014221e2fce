import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


SMALL_RUN = dict(
    num_tasks=3,
    basis=2,
    epochs=1,
    width=0.5,
    max_train_samples=96,
    max_test_samples=64,
    val_fraction=0.05,
    batch_size=32,
    pool=0,
)
"""Per-task statistics (no calibration pool), so the tests of stored statistics can use it."""


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A finished tiny training run on real Fashion-MNIST (2 basis masks, 1 alpha task)."""
    from supsup_deploy.data import DEBIAN_FASHION_MNIST
    from supsup_deploy.train import train_run
    from supsup_deploy.train_config import TrainConfig

    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    run_dir = tmp_path_factory.mktemp("small_run") / "run"
    train_run(TrainConfig(**SMALL_RUN), run_dir)
    return run_dir

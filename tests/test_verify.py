"""``supsup verify``: every check runs for real and a failing one fails the command."""

import json

import pytest
from cli_runner import run_cli

from supsup_deploy import report
from supsup_deploy.pack import pack_run
from supsup_deploy.verify import verify_architecture, verify_bundle


def test_quick_verify_passes():
    result = run_cli("verify", "--quick", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(result.stdout)
    assert [row["arch"] for row in results] == ["gem_resnet18", "resnet18"]
    for row in results:
        assert row["ok"] and row["bytes_ok"] and row["bytes_checked"] == 18  # 2 + 4 per task
        assert row["max_abs_diff"] <= 1e-4 and row["shared_max_abs_diff"] <= 1e-4
        assert row["specialized_max_abs_diff"] <= 1e-4
        assert set(row["seconds"]) == {
            *("pack", "load", "materialize", "bytes", "export", "shared", "specialized")
        }


def test_wrong_byte_prediction_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "bitmask_bytes", lambda summary: 1)
    result = verify_architecture("gem_resnet18", tmp_path / "w")
    assert not result.ok and "storage report predicts" in result.error


def test_wrong_materialised_weights_fail(tmp_path, monkeypatch):
    from supsup_deploy.bundles.reader import Bundle

    original = Bundle.materialize

    def shifted(self, task, **kwargs):
        weights = original(self, task, **kwargs)
        weights[0].mul_(1.001)
        return weights

    monkeypatch.setattr(Bundle, "materialize", shifted)
    result = verify_architecture("gem_resnet18", tmp_path / "w")
    assert not result.ok and "alpha formula" in result.error


@pytest.mark.parametrize(
    "encoding",
    ["packed", *(pytest.param(name, marks=pytest.mark.slow) for name in ("rice", "sparse"))],
)
def test_trained_bundle_has_accuracy_parity(small_run, tmp_path, encoding):
    pack_run(small_run, tmp_path / "bundle", mask_encoding=encoding)
    result = verify_bundle(tmp_path / "bundle", tmp_path / "work")
    assert result.ok, result.error
    basis_components = 2 if encoding == "packed" else 3
    assert result.bytes_ok and result.bytes_checked == basis_components + 4 * 3  # 4 per task
    assert len(result.accuracy) == result.tasks
    for row in result.accuracy:
        assert row["differing_predictions"] == row["shared_differing_predictions"] == 0
        assert row["torch_accuracy"] == row["onnx_accuracy"] == row["shared_accuracy"]


@pytest.mark.parametrize(
    "args", [("--arch", "resnet19"), ("--bundle", "/nonexistent"), ("--bundle", "x", "--run", "y")]
)
def test_bad_arguments_are_one_line(args):
    result = run_cli("verify", *args)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_verify_all_architectures():
    result = run_cli("verify", "--arch", "all", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(row["ok"] for row in json.loads(result.stdout))

"""Storage accounting: counts from the real architectures, the poster's table, bytes on disk."""

import csv
import io
import json
import math
import subprocess
import sys

import pytest

from supsup_deploy.models import get_model_entry, list_models, summarize_model
from supsup_deploy.pack import pack_run
from supsup_deploy.report import (
    POSTER_ROWS,
    SCHEMES,
    StorageSettings,
    bitmask_bytes,
    compare_bundle_bytes,
    csc_bytes,
    standard_parameter_count,
    storage_row,
)

TORCHVISION_NAMES = [name for name in list_models() if get_model_entry(name).torchvision_name]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "supsup_deploy", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("arch", TORCHVISION_NAMES)
def test_counts_match_torchvision(arch):
    row = storage_row(arch)
    check = row.torchvision
    assert check is not None and check["match"], check
    assert check["masked_weights"] == row.summary.masked_weights
    assert check["parameters"] == standard_parameter_count(row.summary)


def test_resnet18_row_is_the_documented_one():
    row = storage_row("resnet18", StorageSettings(num_basis=15, num_tasks=10, density=0.5))
    assert (row.summary.masked_layers, row.summary.masked_weights) == (21, 11_678_912)
    assert row.task_bytes["dense_fp32"] == 4 * 11_678_912
    assert row.task_bytes["alpha_fp32"] == 4 * 15 * 21
    assert row.task_bytes["alpha_fp16"] == 2 * 15 * 21
    assert row.norm_bytes == 2 * 4800 * 4
    assert row.macs_per_image == 1_814_073_344
    for scheme in SCHEMES:
        per_task = row.task_bytes[scheme] + row.norm_bytes
        assert row.total_bytes(scheme) == row.shared_bytes[scheme] + 10 * per_task
    assert row.shared_bytes["alpha_fp16"] == 15 * row.task_bytes["supsup_bitmask"]


def test_mask_encodings_sizes_follow_their_definitions():
    summary = summarize_model("gem_resnet18")
    shapes = summary.weight_shapes
    assert bitmask_bytes(summary) == sum(math.ceil(math.prod(s) / 8) for s in shapes)
    full = sum(2 * math.prod(s) + 4 * (math.prod(s[1:]) + 1) for s in shapes)
    assert csc_bytes(summary, 1.0) == full
    assert csc_bytes(summary, 0.02) < bitmask_bytes(summary) < csc_bytes(summary, 0.5)


def test_statistic_free_norm_costs_nothing_per_task():
    assert storage_row("gem_resnet18", norm="group").norm_bytes == 0
    half = storage_row("gem_resnet18", StorageSettings(norm_dtype="float16"))
    assert half.norm_bytes == 2 * 1500 * 2


@pytest.mark.parametrize(
    "poster", [row for row in POSTER_ROWS if row.arch], ids=lambda row: row.arch
)
def test_poster_rows_are_near_ours_and_self_consistent(poster):
    summary = summarize_model(poster.arch)
    params = float(poster.params.rstrip("M")) * 1e6
    assert poster.values_per_mask == math.ceil(params / 64)
    assert poster.values_per_new_task == 15 * poster.conv_layers
    assert abs(standard_parameter_count(summary) - params) / params < 0.005
    assert summary.masked_layers - poster.conv_layers in (0, 1)


def test_too_small_input_and_bad_settings_are_config_errors():
    from supsup_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="--basis"):
        StorageSettings(num_basis=17)
    with pytest.raises(ConfigError):
        StorageSettings(density=0.0)
    with pytest.raises(ConfigError, match="norm dtype"):
        StorageSettings(norm_dtype="int8")


def test_packed_bundle_bytes_are_exactly_predicted(small_run, tmp_path):
    for norm_dtype in ("float32", "float16"):
        bundle = pack_run(small_run, tmp_path / norm_dtype, norm_dtype=norm_dtype)
        checks = compare_bundle_bytes(bundle)
        assert checks and all(check["ok"] for check in checks), checks
        assert len(checks) == 2 + 3 * len(bundle.tasks)


def test_storage_cli_formats(tmp_path):
    result = run_cli(
        "report", "storage", "--json", "--tasks", "7", "--plot", str(tmp_path / "s.png")
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["arch"]: row for row in report["rows"]}
    assert set(rows) == set(list_models())
    assert report["settings"]["num_tasks"] == 7
    assert rows["resnet50"]["torchvision"]["match"]
    assert len(report["poster"]) == 8
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = run_cli("report", "storage", "--csv", "--arch", "resnet18", "--arch", "resnet50")
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["arch"] for row in table] == ["resnet18", "resnet50"]
    assert int(table[0]["weights"]) == 11_678_912

    result = run_cli("report", "storage", "--markdown", "--arch", "gem_resnet18")
    assert result.returncode == 0, result.stderr
    assert "| gem_resnet18 | 21 | 1,090,940 |" in result.stdout
    assert "Wide ResNet-34 (resnet34)" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("--basis", "99"), "--basis"),
        (("--arch", "resnet19"), "unknown architecture"),
        (("--stem", "tiny"), "'imagenet', 'cifar'"),
        (("--json", "--csv"), "choose one"),
    ],
)
def test_storage_cli_bad_input_is_one_line(args, message):
    result = run_cli("report", "storage", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_storage_page_in_docs_is_current():
    from pathlib import Path

    from supsup_deploy.report import storage_markdown, storage_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "STORAGE.md").read_text()
    settings = StorageSettings()
    assert storage_markdown(storage_table(settings=settings), settings) in page

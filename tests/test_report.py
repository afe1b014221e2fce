"""Storage accounting: counts from the real architectures, the poster's table, bytes on disk."""

import csv
import io
import json
import math

import pytest
from cli_runner import run_cli

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


@pytest.mark.parametrize("encoding", ["packed", "rice", "sparse"])
def test_packed_bundle_bytes_are_exactly_predicted(small_run, tmp_path, encoding):
    for norm_dtype in ("float32", "float16"):
        bundle = pack_run(
            small_run, tmp_path / norm_dtype, norm_dtype=norm_dtype, mask_encoding=encoding
        )
        checks = compare_bundle_bytes(bundle)
        assert checks and all(check["ok"] for check in checks), checks
        basis_components = 2 if encoding == "packed" else 3  # masks (, sizes), file
        assert len(checks) == basis_components + 4 * len(bundle.tasks)  # alpha, norm, sig., file
        signatures = [check for check in checks if check["component"].endswith(".signature")]
        assert [check["predicted"] for check in signatures] == [136] * len(bundle.tasks)
        masks = next(check for check in checks if check["component"] == "basis.masks")
        packed_bytes = bundle.num_basis * bitmask_bytes(bundle.summary)
        assert (masks["predicted"] == packed_bytes) == (encoding == "packed")


def test_storage_cli_formats(tmp_path):
    result = run_cli(
        "report", "storage", "--json", "--num-tasks", "7", "--plot", str(tmp_path / "s.png")
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


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory):
    from tiny_bundles import write_tiny_bundle

    return write_tiny_bundle(tmp_path_factory.mktemp("storage") / "bundle", density=0.3)


def test_storage_of_the_users_bundle(random_bundle, tmp_path):
    from supsup_deploy.bundles.reader import load_bundle

    bundle = load_bundle(random_bundle)
    on_disk = bundle.basis_path.stat().st_size + sum(i.path.stat().st_size for i in bundle.tasks)
    plot = tmp_path / "mine.png"
    result = run_cli(
        "report", "storage", "--bundle", str(random_bundle), "--json", "--plot", str(plot)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["num_basis"] == 2 and report["settings"]["num_tasks"] == 3
    assert report["settings"]["input_size"] == 12
    assert report["settings"]["density"] == pytest.approx(0.3, abs=0.02)  # measured
    (row,) = report["rows"]
    assert row["config"]["width"] == 0.25 and row["config"]["in_channels"] == 1
    assert row["bundle"]["bytes_on_disk"] == on_disk and row["bundle"]["tasks"] == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = run_cli("report", "storage", "--bundle", str(random_bundle))
    assert result.returncode == 0, result.stderr
    assert "gem_resnet18 (your bundle)" in result.stdout
    assert f"{on_disk:,} bytes on disk" in result.stdout
    assert "|B| = 2" in result.stdout and "T = 3 tasks" in result.stdout
    assert "0 of 0" not in result.stdout and "none of these rows" in result.stdout
    assert "both at the poster's |B| = 15" in result.stdout

    result = run_cli("report", "storage", "--bundle", str(random_bundle), "--arch", "resnet18")
    assert result.returncode == 2 and "drop --arch" in result.stderr
    result = run_cli("report", "storage", "--bundle", str(tmp_path / "missing"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_storage_report_cites_only_files_in_the_repository():
    import re
    from pathlib import Path

    from supsup_deploy.report import storage_markdown, storage_table

    root = Path(__file__).resolve().parents[1]
    settings = StorageSettings()
    text = storage_markdown(storage_table(["gem_resnet18"], settings), settings)
    cited = set(re.findall(r"[A-Za-z_/]+\.md", text))
    assert all(list(root.rglob(Path(name).name)) for name in cited), cited


def test_both_alpha_lines_are_drawn_apart():
    """Their totals nearly coincide, so the two lines must differ in style to both be seen."""
    from supsup_deploy.report import SCHEME_STYLES

    fp32, fp16 = SCHEME_STYLES["alpha_fp32"], SCHEME_STYLES["alpha_fp16"]
    assert fp32.get("linestyle") != fp16.get("linestyle") and fp16.get("marker")

"""Storage accounting: bytes per task for every storage scheme, and what a bundle holds.

Every figure is computed from the registered architectures (on the meta device, nothing
allocated) and the format's rules; the only typed-in numbers are the poster's own, kept apart in
:data:`POSTER_ROWS` to be compared with ours.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy.alpha_codes import alpha_dtype_name
from supsup_deploy.binary_masks import check_density, check_num_basis, kept_count
from supsup_deploy.bundles.format import (
    FLOAT_DTYPES,
    SIGNATURE_SCALE_SHAPE,
    SIGNATURE_SCALE_TENSOR,
    SIGNATURE_SHAPE,
    SIGNATURE_TENSOR,
    float_dtype,
)
from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.bundles.validation import stored_groups
from supsup_deploy.errors import ConfigError
from supsup_deploy.files import atomic_write_bytes, safetensors_layout
from supsup_deploy.mask_compression import encode_mask
from supsup_deploy.models import (
    ModelConfig,
    ModelSummary,
    get_model_entry,
    list_models,
    summarize_model,
)
from supsup_deploy.outputs import PLOT_SOFTWARE

SCHEMES = ("dense_fp32", "supsup_bitmask", "supsup_csc_int16", "alpha_fp32", "alpha_fp16")
SCHEME_LABELS = {
    "dense_fp32": "dense fine-tuned copy (fp32)",
    "supsup_bitmask": "SupSup bitmask",
    "supsup_csc_int16": "SupSup sparse CSC (int16 indices)",
    "alpha_fp32": "alpha table (fp32)",
    "alpha_fp16": "alpha table (fp16)",
}
SCHEME_DEFINITIONS = {
    "dense_fp32": "4 bytes per masked weight",
    "supsup_bitmask": "1 bit per masked weight, each layer padded to whole bytes",
    "supsup_csc_int16": (
        "each layer as an [outputs, fan-in] matrix in compressed sparse columns: 2 bytes (int16 "
        "row index) per kept weight at the given density plus 4 bytes (int32) per column pointer"
    ),
    "alpha_fp32": "|B| values per masked layer, 4 bytes each; the |B| basis bitmasks are shared",
    "alpha_fp16": "|B| values per masked layer, 2 bytes each; the |B| basis bitmasks are shared",
}
NORM_DEFINITION = (
    "per-task running mean and variance of every batch-norm channel (0 for statistic-free norms); "
    "added to every scheme's per-task bytes"
)
ALPHA_SCHEMES = ("alpha_fp32", "alpha_fp16")
WORD_BITS = 64


@dataclass(frozen=True)
class PosterRow:
    """One row of the poster's storage table, as printed there."""

    name: str
    params: str
    conv_layers: int
    values_per_mask: int
    values_per_new_task: int
    arch: str | None

    def to_dict(self) -> dict[str, Any]:
        """The row as printed on the poster (without our architecture name)."""
        return {key: value for key, value in asdict(self).items() if key != "arch"}


POSTER_BASIS = 15
POSTER_ROWS = (
    PosterRow("ResNet-18", "6.2M", 21, 96875, 315, None),
    PosterRow("Wide ResNet-18", "11.7M", 21, 182813, 315, "resnet18"),
    PosterRow("Wide ResNet-34", "21.8M", 37, 340625, 555, "resnet34"),
    PosterRow("ResNet-50", "25.6M", 53, 400000, 795, "resnet50"),
    PosterRow("ResNet-101", "44.5M", 104, 695313, 1560, "resnet101"),
    PosterRow("ResNet-152", "60.2M", 155, 940625, 2325, "resnet152"),
    PosterRow("WRN-50-2-bottleneck", "68.9M", 53, 1076563, 795, "wide_resnet50_2"),
    PosterRow("pre-ResNet-200", "64.7M", 203, 1010938, 3045, "preact_resnet200"),
)
POSTER_NOTES = (
    "The poster's #values/mask is its rounded #params divided by 64, rounded up: one value is a "
    "64-bit word of a bitmask over every parameter, batch-norm and bias included. Ours counts "
    "64-bit words over the masked (conv and classifier) weights only, the weights a mask can "
    "switch.",
    "The poster's #values/new task is 15 x its conv-layer count. That count includes the "
    "classifier for ResNet-18/34 (21, 37) but not for the deeper networks (53, 104, 155, 203), "
    "which have one more masked layer each; ours is |B| x masked layers, classifier included, "
    "and an honest per-task figure must also add the normalisation statistics (the norm "
    "column: a task's own running mean and variance, which no basis mask holds).",
    "'Wide ResNet-18/34' in the poster are the standard ResNet-18/34 (11.7M and 21.8M "
    "parameters); its 'ResNet-18 6.2M' row matches no standard network, so it has no row of ours.",
)


@dataclass(frozen=True)
class StorageSettings:
    """What the storage table assumes.

    Attributes:
        num_basis: basis masks ``|B|`` (the poster used 15).
        num_tasks: tasks ``T`` for the totals; with alpha schemes the basis tasks are among them.
        density: fraction of weights a SupSup mask keeps (sets the CSC size).
        norm_dtype: ``"float32"`` or ``"float16"`` for stored normalisation statistics.
        input_size: input height and width for the multiply-accumulate count.
    """

    num_basis: int = POSTER_BASIS
    num_tasks: int = 100
    density: float = 0.5
    norm_dtype: str = "float32"
    input_size: int = 224

    def __post_init__(self) -> None:
        check_num_basis(self.num_basis, name="--basis")
        if self.num_tasks < 1:
            raise ConfigError(f"--tasks must be at least 1, got {self.num_tasks}")
        check_density(self.density)
        float_dtype(self.norm_dtype)
        if self.input_size < 1:
            raise ConfigError(f"--input-size must be positive, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StorageRow:
    """Storage of one configured architecture under every scheme."""

    summary: ModelSummary
    settings: StorageSettings
    macs_per_image: int
    task_bytes: dict[str, int]
    norm_bytes: int
    shared_bytes: dict[str, int]
    torchvision: dict[str, Any] | None = None
    poster: PosterRow | None = None
    bundle: dict[str, Any] | None = None

    @property
    def arch(self) -> str:
        return self.summary.config.arch

    @property
    def label(self) -> str:
        """The row's name in tables and plots: the architecture, marked when it is a bundle's."""
        return f"{self.arch} (your bundle)" if self.bundle else self.arch

    def per_task_bytes(self, scheme: str) -> int:
        """Bytes one more task costs under ``scheme``, normalisation statistics included."""
        return self.task_bytes[scheme] + self.norm_bytes

    def total_bytes(self, scheme: str, tasks: int | None = None) -> int:
        """Bytes for ``tasks`` tasks (default: the settings' ``num_tasks``) under ``scheme``."""
        count = self.settings.num_tasks if tasks is None else tasks
        return self.shared_bytes[scheme] + count * self.per_task_bytes(scheme)

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary
        poster = None if self.poster is None else self.poster.to_dict()
        return {
            "arch": self.arch,
            "config": summary.config.to_dict(),
            "masked_layers": summary.masked_layers,
            "masked_weights": summary.masked_weights,
            "standard_parameters": standard_parameter_count(summary),
            "norm_layers": summary.norm_layers,
            "norm_channels": summary.norm_channels,
            "macs_per_image": self.macs_per_image,
            "task_bytes": dict(self.task_bytes),
            "norm_bytes_per_task": self.norm_bytes,
            "shared_bytes": dict(self.shared_bytes),
            "per_task_bytes": {scheme: self.per_task_bytes(scheme) for scheme in SCHEMES},
            "total_bytes": {scheme: self.total_bytes(scheme) for scheme in SCHEMES},
            "torchvision": self.torchvision,
            "ours_in_poster_units": poster_units(summary, self.settings.num_basis),
            "poster": poster,
            **({"bundle": self.bundle} if self.bundle else {}),
        }


def bitmask_bytes(summary: ModelSummary) -> int:
    """Bytes of one bit-packed mask over every masked layer (each layer padded to bytes)."""
    return sum(math.ceil(math.prod(shape) / 8) for shape in summary.weight_shapes)


def csc_bytes(summary: ModelSummary, density: float) -> int:
    """Bytes of one mask as per-layer CSC matrices with int16 row indices, int32 pointers."""
    total = 0
    for shape in summary.weight_shapes:
        numel = math.prod(shape)
        fan_in = numel // shape[0]
        total += 2 * kept_count(numel, density) + 4 * (fan_in + 1)
    return total


def standard_parameter_count(summary: ModelSummary) -> int:
    """Parameters of the standard (unmasked) network: weights, BN affine pairs, classifier bias.

    This is what torchvision and the poster count as #params (e.g. 11,689,512 for resnet18).
    """
    return summary.masked_weights + 2 * summary.norm_channels + summary.config.num_classes


def poster_units(summary: ModelSummary, num_basis: int) -> dict[str, int]:
    """Our counts in the poster's units: 64-bit words per mask, values per new task."""
    return {
        "words64_per_mask": math.ceil(summary.masked_weights / WORD_BITS),
        "alpha_values_per_new_task": num_basis * summary.masked_layers,
        "norm_values_per_new_task": norm_bytes_per_task(summary)
        // FLOAT_DTYPES["float32"].itemsize,
    }


def norm_bytes_per_task(summary: ModelSummary, norm_dtype: str = "float32") -> int:
    """Bytes of one task's normalisation statistics (running mean and variance)."""
    if summary.config.norm != "batch":
        return 0
    return 2 * summary.norm_channels * float_dtype(norm_dtype).itemsize


def storage_row(arch: str, settings: StorageSettings | None = None, **options: Any) -> StorageRow:
    """Storage of one architecture under every scheme.

    Args:
        arch: a registered architecture.
        settings: basis size, task count, density, norm dtype and input size.
        **options: ModelConfig overrides (``num_classes``, ``stem``, ...); by default the entry's
            standard configuration.

    Returns:
        A :class:`StorageRow`, with torchvision's counts for the same name as a check when the
        configuration is torchvision's (ImageNet stem, width 1, 3 input channels).

    Example:
        >>> storage_row("resnet18").summary.masked_weights
        11678912
    """
    settings = settings or StorageSettings()
    summary = summarize_model(arch, **options)
    mask = bitmask_bytes(summary)
    layers = summary.masked_layers
    task_bytes = {
        "dense_fp32": 4 * summary.masked_weights,
        "supsup_bitmask": mask,
        "supsup_csc_int16": csc_bytes(summary, settings.density),
        "alpha_fp32": 4 * settings.num_basis * layers,
        "alpha_fp16": 2 * settings.num_basis * layers,
    }
    shared = {scheme: 0 for scheme in SCHEMES}
    for scheme in ALPHA_SCHEMES:
        shared[scheme] = settings.num_basis * mask
    poster = next((row for row in POSTER_ROWS if row.arch == arch), None)
    return StorageRow(
        summary=summary,
        settings=settings,
        macs_per_image=macs_per_image(summary.config, settings.input_size),
        task_bytes=task_bytes,
        norm_bytes=norm_bytes_per_task(summary, settings.norm_dtype),
        shared_bytes=shared,
        torchvision=torchvision_check(summary),
        poster=poster,
    )


def storage_table(
    archs: list[str] | None = None, settings: StorageSettings | None = None, **options: Any
) -> list[StorageRow]:
    """:func:`storage_row` for each architecture (default: every registered one)."""
    return [storage_row(arch, settings, **options) for arch in archs or list_models()]


def torchvision_check(summary: ModelSummary) -> dict[str, Any] | None:
    """torchvision's conv and linear weight counts for the same name, or None if not comparable."""
    import torchvision

    config = summary.config
    entry = get_model_entry(config.arch)
    standard = entry.config()
    compared = ("stem", "width", "in_channels")
    name = entry.torchvision_name
    if name is None or any(getattr(config, key) != getattr(standard, key) for key in compared):
        return None
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, num_classes=config.num_classes)
    shapes = [
        tuple(module.weight.shape)
        for module in model.modules()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    weights = sum(math.prod(shape) for shape in shapes)
    return {
        "name": name,
        "masked_layers": len(shapes),
        "masked_weights": weights,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "match": shapes == [tuple(shape) for shape in summary.weight_shapes],
    }


def macs_per_image(config: ModelConfig, input_size: int) -> int:
    """Multiply-accumulates of the masked layers for one image (counted on the meta device).

    Raises:
        ConfigError: the input is too small for the architecture.
    """
    from supsup_deploy.models import build_model, masked_layers
    from supsup_deploy.weight_sources import use_fixed

    with torch.device("meta"):
        model = build_model(config)
        layers = masked_layers(model)
        use_fixed(model, [torch.empty(layer.weight_shape) for layer in layers])
    total = 0

    def count(layer, inputs, output) -> None:
        nonlocal total
        total += output[0].numel() * math.prod(layer.weight_shape[1:])

    hooks = [layer.register_forward_hook(count) for layer in layers]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.empty(1, config.in_channels, input_size, input_size, device="meta"))
    except RuntimeError as error:
        raise ConfigError(
            f"{config.arch} cannot take {input_size}x{input_size} inputs "
            f"({str(error).splitlines()[0]}); use a larger --input-size"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    return total


def storage_report(rows: list[StorageRow], settings: StorageSettings) -> dict[str, Any]:
    """A JSON-ready storage report: settings, definitions, rows, the poster's table and notes."""
    return {
        "settings": settings.to_dict(),
        "schemes": {
            scheme: {"label": SCHEME_LABELS[scheme], "counts": SCHEME_DEFINITIONS[scheme]}
            for scheme in SCHEMES
        },
        "norm_state": NORM_DEFINITION,
        "total_bytes": "shared bytes + T x (scheme bytes + norm bytes) for T = num_tasks",
        "rows": [row.to_dict() for row in rows],
        "poster": [{**row.to_dict(), "ours": row.arch} for row in POSTER_ROWS],
        "poster_notes": list(POSTER_NOTES),
    }


PER_TASK_COLUMNS = (
    ("arch", "arch"),
    ("layers", "masked layers"),
    ("weights", "masked weights"),
    ("norm_channels", "norm channels"),
    ("dense_fp32", "dense fp32"),
    ("supsup_bitmask", "bitmask"),
    ("supsup_csc_int16", "CSC int16"),
    ("alpha_fp32", "alpha fp32"),
    ("alpha_fp16", "alpha fp16"),
    ("norm", "norm"),
)
TOTAL_COLUMNS = (
    ("arch", "arch"),
    ("total_dense_fp32", "dense fp32"),
    ("total_supsup_bitmask", "bitmask"),
    ("total_supsup_csc_int16", "CSC int16"),
    ("total_alpha_fp32", "alpha fp32"),
    ("total_alpha_fp16", "alpha fp16"),
)
STORAGE_COLUMNS = PER_TASK_COLUMNS + TOTAL_COLUMNS[1:]
POSTER_COLUMNS = (
    ("poster_name", "poster row"),
    ("poster_params", "poster #params"),
    ("ours_params", "ours #params"),
    ("poster_conv_layers", "poster conv layers"),
    ("poster_values_per_mask", "poster #values/mask"),
    ("ours_words64_per_mask", "ours 64-bit words/mask"),
    ("poster_values_per_new_task", "poster #values/new task"),
    ("ours_values_per_new_task", "ours alpha values/new task"),
    ("ours_norm_values", "ours norm values/new task"),
)


def storage_cells(row: StorageRow) -> dict[str, Any]:
    """One row's cells for :data:`STORAGE_COLUMNS` (plain numbers)."""
    summary = row.summary
    cells: dict[str, Any] = {
        "arch": row.label,
        "layers": summary.masked_layers,
        "weights": summary.masked_weights,
        "norm_channels": summary.norm_channels,
        "norm": row.norm_bytes,
    }
    for scheme in SCHEMES:
        cells[scheme] = row.task_bytes[scheme]
        cells[f"total_{scheme}"] = row.total_bytes(scheme)
    return cells


def poster_cells(poster: PosterRow) -> dict[str, Any]:
    """The poster's row beside ours (our columns empty when the row matches no architecture)."""
    cells: dict[str, Any] = {
        "poster_name": poster.name,
        "poster_params": poster.params,
        "poster_conv_layers": poster.conv_layers,
        "poster_values_per_mask": poster.values_per_mask,
        "poster_values_per_new_task": poster.values_per_new_task,
        "ours_params": "",
        "ours_words64_per_mask": "",
        "ours_values_per_new_task": "",
        "ours_norm_values": "",
    }
    if poster.arch is not None:
        summary = summarize_model(poster.arch)
        cells["ours_params"] = standard_parameter_count(summary)
        units = poster_units(summary, POSTER_BASIS)
        cells["ours_words64_per_mask"] = units["words64_per_mask"]
        cells["ours_values_per_new_task"] = units["alpha_values_per_new_task"]
        cells["ours_norm_values"] = units["norm_values_per_new_task"]
        cells["poster_name"] = f"{poster.name} ({poster.arch})"
    return cells


def storage_markdown(rows: list[StorageRow], settings: StorageSettings) -> str:
    """The storage table, the poster's table beside ours, and what each counts, as Markdown."""
    cells = [storage_cells(row) for row in rows]
    lines = [
        f"Bytes per task, |B| = {settings.num_basis}, density {settings.density}, norm "
        f"statistics {settings.norm_dtype}. The backbone costs 0 bytes: it is regenerated from "
        "its seed.",
        "",
        *_markdown_table(PER_TASK_COLUMNS, cells),
        "",
        f"Total bytes for T = {settings.num_tasks} tasks:",
        "",
        *_markdown_table(TOTAL_COLUMNS, cells),
        "",
        "What each column counts:",
        "",
        *(f"- {SCHEME_LABELS[scheme]}: {SCHEME_DEFINITIONS[scheme]}." for scheme in SCHEMES),
        f"- norm: {NORM_DEFINITION}.",
        "- total: shared bytes (the |B| basis bitmasks, for alpha) + T x (scheme + norm).",
        "",
        f"The poster's table beside ours in its units, both at the poster's |B| = {POSTER_BASIS} "
        "(whatever |B| the tables above use):",
        "",
        *_markdown_table(POSTER_COLUMNS, [poster_cells(poster) for poster in POSTER_ROWS]),
        "",
        *(f"- {note}" for note in POSTER_NOTES),
    ]
    return "\n".join(lines) + "\n"


def _markdown_table(columns, rows: list[dict[str, Any]]) -> list[str]:
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_cell(row[key]) for key, _ in columns) + " |" for row in rows]
    return [header, rule, *body]


def format_cell(value: Any) -> str:
    """A table cell: integers with thousands separators, anything else as text."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def storage_csv(rows: list[StorageRow]) -> str:
    """The storage table as CSV (one row per architecture, plain integers)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow([key for key, _ in STORAGE_COLUMNS])
    for row in rows:
        cells = storage_cells(row)
        writer.writerow([cells[key] for key, _ in STORAGE_COLUMNS])
    return stream.getvalue()


SCHEME_STYLES = {
    "dense_fp32": {"linestyle": "-"},
    "supsup_bitmask": {"linestyle": "-"},
    "supsup_csc_int16": {"linestyle": "-"},
    "alpha_fp32": {"linestyle": "-", "linewidth": 3.0, "alpha": 0.6},
    "alpha_fp16": {"linestyle": "--", "marker": "o", "markevery": 6, "markersize": 4},
}
"""Line styles of the storage plot: the two alpha lines nearly coincide (the shared basis
dominates their totals), so one is wide and pale and the other dashed with markers over it."""


def plot_storage(row: StorageRow, path: str | Path, *, max_tasks: int | None = None) -> Path:
    """Plot total bytes against the number of tasks (log scales), one line per scheme.

    Args:
        row: the architecture's storage row; a bundle's row (:func:`bundle_storage`) also marks
            the bundle's own bytes on disk at its task count.
        path: PNG file to write (atomically).
        max_tasks: right end of the task axis (default: the settings' ``num_tasks``).

    Returns:
        The written path.
    """
    pyplot = headless_pyplot()
    last = max(max_tasks or row.settings.num_tasks, 2)
    counts = sorted({max(1, round(last ** (step / 60))) for step in range(61)})
    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=120)
    for scheme in SCHEMES:
        totals = [row.total_bytes(scheme, count) for count in counts]
        axes.plot(counts, totals, label=SCHEME_LABELS[scheme], **SCHEME_STYLES[scheme])
    if row.bundle:
        tasks, on_disk = row.bundle["tasks"], row.bundle["bytes_on_disk"]
        axes.plot(
            [tasks],
            [on_disk],
            "*",
            color="black",
            markersize=14,
            zorder=5,
            label=f"your bundle: {tasks} tasks, {on_disk:,} bytes on disk",
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("number of tasks")
    axes.set_ylabel("total bytes (norm statistics included)")
    axes.set_title(
        f"{row.label}: storage vs tasks (|B| = {row.settings.num_basis}, "
        f"density {row.settings.density:.3g})"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def headless_pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def save_figure(figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it; its software tag names this package (no
    version, so the same figure gives the same bytes)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": PLOT_SOFTWARE})
    headless_pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def predicted_bundle_bytes(bundle: Bundle) -> dict[str, int]:
    """What the storage accounting predicts for a packed bundle's payload, by component.

    The basis holds ``|B|`` masks per layer: bitmasks (``packed``), or with a compressed
    encoding the streams the encoder gives for the bundle's masks plus one int64 size per mask
    (``basis.mask_sizes``), and its calibration pool's pixels (``basis.pool``, one byte each).
    Each task holds an alpha table of its stored dtype, ``G`` rows per layer (a coded table: one
    code per coefficient, int4 two to a byte over the whole table, and one scale per row),
    the normalisation statistics of their stored dtype unless it stores none, and its signature
    if it has one (float16, or uint8 codes with a float16 step and minimum per row).
    """
    summary = bundle.summary
    predicted = {"basis.masks": basis_mask_bytes(bundle)}
    if bundle_mask_encoding(bundle) != "packed":
        predicted["basis.mask_sizes"] = 8 * bundle.num_basis * summary.masked_layers
    if bundle.pool is not None:
        predicted["basis.pool"] = bundle.pool.numel()
    for info in bundle.tasks:
        tensors = bundle.stored_tensors(info.index)
        alpha = tensors["alpha"]
        scale = tensors.get("alpha.scale")
        rows = summary.masked_layers * stored_groups(tensors)
        codes = rows * bundle.num_basis
        predicted[f"{info.name}.alpha"] = (
            -(-codes // 2) if alpha.dtype == torch.uint8 else alpha.element_size() * codes
        ) + (0 if scale is None else scale.element_size() * rows)
        predicted[f"{info.name}.norm"] = (
            norm_bytes_per_task(summary, _stored_norm_dtype(tensors))
            if "norm.running_mean" in tensors
            else 0
        )
        predicted[f"{info.name}.signature"] = _signature_bytes(tensors)
    return predicted


def _signature_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """A task's signature bytes: none, float16 values, or uint8 codes and a float16 step and
    minimum per row."""
    signature = tensors.get(SIGNATURE_TENSOR)
    if signature is None:
        return 0
    values = math.prod(SIGNATURE_SHAPE)
    if signature.dtype == torch.uint8:
        return values + 2 * math.prod(SIGNATURE_SCALE_SHAPE)
    return 2 * values


def _stored_norm_dtype(tensors: dict[str, torch.Tensor]) -> str:
    """The name of the dtype a task stores its norm statistics in (float32 when it has none)."""
    return _dtype_name(tensors.get("norm.running_mean")) or "float32"


def basis_density(bundle: Bundle) -> float:
    """The share of masked weights the bundle's basis masks keep, over all of them."""
    kept = sum(
        int(np.unpackbits(bundle.packed_basis(layer).numpy()).sum())
        for layer in range(bundle.summary.masked_layers)
    )
    return kept / (bundle.num_basis * bundle.summary.masked_weights)


def _statistics_source(bundle: Bundle, stored: dict[str, torch.Tensor]) -> str | None:
    """Where a task's normalisation statistics come from: ``"stored"`` in its file, ``"pool"``
    (computed from the bundle's calibration pool), or None (a statistic-free norm)."""
    if bundle.config.norm != "batch":
        return None
    return "stored" if "norm.running_mean" in stored else "pool"


def _dtype_name(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    return str(tensor.dtype).removeprefix("torch.")


def bundle_mask_encoding(bundle: Bundle) -> str:
    """How the bundle's basis masks are stored: ``packed``, ``rice`` or ``sparse``."""
    return bundle.metadata.get("mask_encoding", "packed")


def basis_mask_bytes(bundle: Bundle) -> int:
    """Bytes of the bundle's ``|B|`` basis masks in its encoding (sizes tables not included).

    ``packed`` is 1 bit per weight, each layer padded to bytes; a compressed encoding depends
    on where the kept weights lie, so each mask is encoded again from its decoded bits.
    """
    encoding = bundle_mask_encoding(bundle)
    if encoding == "packed":
        return bundle.num_basis * bitmask_bytes(bundle.summary)
    total = 0
    for layer, shape in enumerate(bundle.summary.weight_shapes):
        numel = math.prod(shape)
        for row in bundle.packed_basis(layer):
            total += len(encode_mask(row.numpy(), numel, encoding))
    return total


def measured_bundle_bytes(bundle: Bundle) -> dict[str, int]:
    """A bundle's payload bytes on disk by component (the keys of :func:`predicted_bundle_bytes`),
    plus ``*.header`` entries and ``*.file`` sizes."""
    header, payload = safetensors_layout(bundle.basis_path)
    measured = {
        "basis.masks": sum(size for name, size in payload.items() if name.startswith("mask.")),
        "basis.mask_sizes": sum(
            size for name, size in payload.items() if name.startswith("mask_sizes.")
        ),
        "basis.pool": payload.get("pool", 0),
        "basis.header": header,
        "basis.file": bundle.basis_path.stat().st_size,
    }
    for info in bundle.tasks:
        header, payload = safetensors_layout(info.path)
        measured[f"{info.name}.alpha"] = payload.get("alpha", 0) + payload.get("alpha.scale", 0)
        measured[f"{info.name}.norm"] = sum(
            size for name, size in payload.items() if name.startswith("norm.")
        )
        measured[f"{info.name}.signature"] = payload.get(SIGNATURE_TENSOR, 0) + payload.get(
            SIGNATURE_SCALE_TENSOR, 0
        )
        measured[f"{info.name}.header"] = header
        measured[f"{info.name}.file"] = info.path.stat().st_size
    return measured


def compare_bundle_bytes(bundle: Bundle) -> list[dict[str, Any]]:
    """Predicted against measured payload bytes per component; each file must also add up.

    Returns:
        One entry per component (``predicted``, ``measured``, ``ok``) and one per file checking
        ``file size == header + predicted payload``.
    """
    predicted = predicted_bundle_bytes(bundle)
    measured = measured_bundle_bytes(bundle)
    checks = [
        {
            "component": key,
            "predicted": value,
            "measured": measured[key],
            "ok": value == measured[key],
        }
        for key, value in predicted.items()
    ]
    for prefix in ["basis", *(info.name for info in bundle.tasks)]:
        payload = sum(value for key, value in predicted.items() if key.startswith(f"{prefix}."))
        expected = measured[f"{prefix}.header"] + payload
        checks.append(
            {
                "component": f"{prefix}.file",
                "predicted": expected,
                "measured": measured[f"{prefix}.file"],
                "ok": expected == measured[f"{prefix}.file"],
            }
        )
    return checks


def bundle_storage(bundle: Bundle) -> StorageRow:
    """The storage row of a bundle's own architecture and settings, marked as the bundle's.

    Settings come from the bundle: ``|B|``, its task count, its input size, the dtype of its
    stored norm statistics and its basis masks' measured density (the CSC column's size).
    ``row.bundle`` holds what is on disk: path, tasks, mask encoding, file bytes.

    Args:
        bundle: from :func:`supsup_deploy.load_bundle`.

    Returns:
        A :class:`StorageRow` whose ``bundle`` entry marks it in tables and plots.
    """
    norm_dtype = "float32"
    if bundle.tasks:
        norm_dtype = _stored_norm_dtype(bundle.stored_tensors(bundle.tasks[0].index))
    density = basis_density(bundle)
    settings = StorageSettings(
        num_basis=bundle.num_basis,
        num_tasks=max(len(bundle.tasks), 1),
        density=max(density, 1e-9),
        norm_dtype=norm_dtype,
        input_size=bundle.input.size,
    )
    options = {
        key: value
        for key, value in bundle.config.to_dict().items()
        if key not in ("arch", "num_tasks")
    }
    row = storage_row(bundle.config.arch, settings, **options)
    basis_bytes = bundle.basis_path.stat().st_size
    task_bytes = sum(info.path.stat().st_size for info in bundle.tasks)
    marker = {
        "path": str(bundle.path),
        "tasks": len(bundle.tasks),
        "num_basis": bundle.num_basis,
        "mask_encoding": bundle_mask_encoding(bundle),
        "basis_density": density,
        "basis_file_bytes": basis_bytes,
        "task_file_bytes": task_bytes,
        "bytes_on_disk": basis_bytes + task_bytes,
    }
    return dataclasses.replace(row, bundle=marker)


def bundle_report(bundle: Bundle) -> dict[str, Any]:
    """A JSON-ready description of a loaded (hence validated) bundle and its bytes.

    Args:
        bundle: from :func:`supsup_deploy.load_bundle`.

    Returns:
        Backbone, basis and per-task facts, with bytes on disk for every file.
    """
    basis_bytes = bundle.basis_path.stat().st_size
    tasks = []
    for info in bundle.tasks:
        tensors = bundle.stored_tensors(info.index)
        tasks.append(
            {
                "index": info.index,
                "name": info.name,
                "kind": info.kind,
                "class_names": list(info.class_names),
                "file": str(info.path.relative_to(bundle.path)),
                "file_bytes": info.file_bytes,
                "state_bytes": info.state_bytes,
                "alpha_dtype": alpha_dtype_name(tensors["alpha"]),
                "alpha_groups": stored_groups(tensors),
                "norm_dtype": _dtype_name(tensors.get("norm.running_mean")),
                "statistics": _statistics_source(bundle, tensors),
                "signature": SIGNATURE_TENSOR in tensors,
                "test_accuracy": info.metrics.get("test_accuracy"),
            }
        )
    return {
        "path": str(bundle.path),
        "format_version": bundle.format_version,
        "checked": (
            f"basis and {len(tasks)} task files: format, version, content hash, basis hash, "
            "tensor names and shapes"
        ),
        "model": bundle.config.to_dict(),
        "input": bundle.input.to_dict(),
        "masked_layers": bundle.summary.masked_layers,
        "masked_weights": bundle.summary.masked_weights,
        "norm_channels": bundle.summary.norm_channels,
        "num_basis": bundle.num_basis,
        "mask_encoding": bundle_mask_encoding(bundle),
        "basis_density": basis_density(bundle),
        "pool_images": 0 if bundle.pool is None else len(bundle.pool),
        "basis_sha256": bundle.basis_sha256,
        "basis_file_bytes": basis_bytes,
        "basis_bits_per_weight": 8 * basis_bytes / bundle.summary.masked_weights,
        "tasks": tasks,
        "total_bytes": basis_bytes + sum(task["file_bytes"] for task in tasks),
    }

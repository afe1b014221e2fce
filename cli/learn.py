"""``supsup learn``: argument parsing and printing only (the training lives in
:mod:`supsup_deploy.learn`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ._choices import AlphaDtype, Dataset, FloatDtype, Statistics
from ._common import (
    DEFAULT_BUNDLE,
    DEVICE_HELP,
    adapter_graph,
    one_line_errors,
    open_bundle,
    path_option,
    print_json,
    use_device,
)


@one_line_errors
def learn_command(
    bundle_path: Annotated[
        Path, typer.Argument(help="The bundle to teach (made by `supsup pack`).")
    ] = DEFAULT_BUNDLE,
    data: Annotated[
        Path | None,
        path_option(
            "Image folder: one subfolder per class, optionally under train/, val/ and "
            "test/ (else validation and test are carved from it, seeded)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Required: the new task's name.")] = None,
    dataset: Annotated[
        Dataset | None,
        typer.Option(help="Instead of --data: a built-in dataset, with --classes."),
    ] = None,
    classes: Annotated[
        str | None, typer.Option(help="With --dataset: class ids, comma-separated (e.g. 1,3,5).")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="With --dataset: the folder holding its files.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs; the best by validation is kept.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    alpha_lr: Annotated[float, typer.Option(help="Adam learning rate of the alpha table.")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay.")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of the split, subset and batch order.")] = 0,
    val_fraction: Annotated[
        float, typer.Option(help="Share of each class held out for validation (no val/).")
    ] = 0.1,
    test_fraction: Annotated[
        float, typer.Option(help="Share of each class held out for testing (folder, no test/).")
    ] = 0.1,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Cap on training images (a seeded subset).")
    ] = None,
    alpha_dtype: Annotated[
        AlphaDtype | None,
        typer.Option(
            help="Precision of the stored table; int8 and int4 keep one scale per row, and an "
            "int4 table is trained against its int4 form (default: int4 with pool statistics "
            "in a format 4 bundle, int8 in format 3, else as the bundle's newest alpha task, "
            "else float32)."
        ),
    ] = None,
    alpha_groups: Annotated[
        int | None,
        typer.Option(
            help="Alpha rows per layer, each for its own contiguous group of output channels "
            "(format 4; default: 2 with pool statistics in a format 4 bundle, else 1)."
        ),
    ] = None,
    norm_dtype: Annotated[
        FloatDtype | None,
        typer.Option(help="Precision of the stored statistics (default: as the bundle's tasks)."),
    ] = None,
    statistics: Annotated[
        Statistics | None,
        typer.Option(
            help="BatchNorm statistics: pool (train against the bundle's calibration pool, "
            "store none; the default when it has one) or task (from the task's own images, "
            "stored)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        path_option("Write the task file here instead of installing it (for `supsup add-task`)."),
    ] = None,
    adapter: Annotated[
        Path | None,
        path_option("Also write the task's ONNX Runtime adapter for a shared graph to this file."),
    ] = None,
    graph: Annotated[
        Path | None,
        path_option(
            "With --adapter: the shared graph (default: model.onnx in the folder above the "
            "adapter's)."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace an existing --out or --adapter file even if supsup-deploy did not "
            "write it."
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(help="Processes decoding images (default: none with fewer than 4 cores)."),
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    lock_timeout: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds to wait while another process changes the bundle."),
    ] = 30.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the new task's metrics and data split as JSON.")
    ] = False,
) -> None:
    """Teach a bundle a new task from your own images: an alpha table over its basis masks.

    Images of any mode and size are converted to the bundle's input (channels; resized so the
    shorter side fits, then centre-cropped; normalised as the bundle records). A task may have
    fewer classes than the bundle's outputs: it uses the first ones. Files that are not images
    (by suffix) are ignored and counted; a corrupt or truncated image stops the run with its
    name. The task file is installed under the bundle's lock with the next free id; the bundle
    is unchanged until then (Ctrl-C, errors).
    """
    from supsup_deploy.learn import check_learnable, next_task_id

    _check_learn_options(name, data, dataset, classes, out, adapter, force)
    bundle = open_bundle(bundle_path)
    check_learnable(bundle, name, install=out is None)
    graph = _check_adapter_paths(adapter, graph, force)
    folder = _scan(bundle, data, val_fraction, test_fraction, seed) if data is not None else None
    learned = _train(
        bundle,
        data,
        folder,
        name=name,
        dataset=dataset,
        classes=classes,
        data_root=data_root,
        epochs=epochs,
        batch_size=batch_size,
        alpha_lr=alpha_lr,
        weight_decay=weight_decay,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_train_samples=max_train_samples,
        alpha_dtype=alpha_dtype,
        alpha_groups=alpha_groups,
        norm_dtype=norm_dtype,
        statistics=statistics,
        device=use_device(device),
        num_workers=workers,
    )
    if out is not None:
        index = next_task_id(bundle)
        path = learned.save(out, index=index, bundle=bundle)
    else:
        from supsup_deploy.learn import install_learned_task

        info = install_learned_task(bundle_path, learned, lock_timeout=lock_timeout)
        index, path = info.index, info.path
    summary = {"task": index, "name": name, "path": str(path), "installed": out is None}
    summary.update(file_bytes=path.stat().st_size, metrics=learned.metrics, data=learned.data)
    if adapter is not None:
        summary["adapter"] = _write_adapter(bundle_path, index, adapter, graph, force)
    if as_json:
        print_json(summary)
        return
    _print_summary(summary, learned)


def _check_learn_options(name, data, dataset, classes, out, adapter, force) -> None:
    """Refuse option combinations ``learn`` cannot run, and an ``--out`` it may not write."""
    from supsup_deploy.bundles.format import TASK_FILE
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.outputs import check_output

    if name is None:
        raise ConfigError("give the new task's name with --name NAME")
    if data is not None and (dataset is not None or classes is not None):
        raise ConfigError("give either --data FOLDER or --dataset NAME --classes IDS, not both")
    if out is not None and adapter is not None:
        raise ConfigError("--adapter needs the task installed: leave out --out")
    if out is not None:
        check_output(out, TASK_FILE, force=force)


def _check_adapter_paths(adapter: Path | None, graph: Path | None, force: bool) -> Path | None:
    """The shared graph an adapter is for, checked before training."""
    from supsup_deploy.errors import ConfigError

    if adapter is None:
        if graph is not None:
            raise ConfigError("--graph goes with --adapter FILE")
        return None
    return adapter_graph(adapter, graph, force=force)


def _scan(bundle, data: Path, val_fraction: float, test_fraction: float, seed: int):
    """List and check every image of the folder before anything is trained."""
    from supsup_deploy.image_folder import scan_image_folder

    from ._progress import progress_bar

    with progress_bar(f"checking {data}", None) as advance:
        checked = 0

        def progress(count: int) -> None:
            nonlocal checked
            advance(count - checked)
            checked = count

        return scan_image_folder(
            data,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            progress=progress,
        )


def _train(bundle, data, folder, **settings):
    """Train with progress bars; Ctrl-C exits 130 with the bundle untouched."""
    from rich.console import Console

    from supsup_deploy.learn import learn_task

    from ._progress import RichReporter, make_progress

    try:
        with make_progress(Console(stderr=True)) as progress:
            reporter = RichReporter(progress, 1, 0)
            return learn_task(bundle, data, folder=folder, reporter=reporter, **settings)
    except KeyboardInterrupt:
        print(f"interrupted; {bundle.path} is unchanged", file=sys.stderr)
        raise typer.Exit(130) from None


def _write_adapter(bundle_path: Path, index: int, adapter: Path, graph: Path, force: bool):
    """The new task's adapter for the shared graph, parity checked, as ``export --adapter``."""
    from supsup_deploy.onnx_graphs.export import export_adapter

    report = export_adapter(open_bundle(bundle_path), index, adapter, graph=graph, force=force)
    return report.to_dict()


def _print_summary(summary: dict, learned) -> None:
    metrics = summary["metrics"]
    test = metrics["test_accuracy"]
    where = "installed as" if summary["installed"] else "written as"
    print(
        f"task {summary['task']} ({summary['name']}) {where} {summary['path']}: "
        f"{summary['file_bytes']:,} bytes, classes {', '.join(learned.class_names)}"
    )
    print(
        f"best epoch {metrics['best_epoch'] + 1} of {metrics['epochs']}: val accuracy "
        f"{metrics['val_accuracy']:.4f}, test accuracy "
        + ("none (no test images)" if test is None else f"{test:.4f}")
        + f" ({metrics['train_samples']} training images)"
    )
    ignored = summary["data"].get("ignored", 0)
    if ignored:
        print(f"ignored {ignored} files that are not images (by suffix)")
    if "adapter" in summary:
        print(f"adapter: {summary['adapter']['adapter']} (parity checked)")

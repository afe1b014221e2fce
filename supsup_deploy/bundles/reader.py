"""Reading bundles: :func:`load_bundle` opens one as a :class:`Bundle`.

Opening a bundle reads and checks its basis and lists ``tasks/`` by file name; a task file is
read, checked and cached the first time the task is used (format 1 bundles, whose file names
carry no id, are read whole when opened). The checks are :mod:`supsup_deploy.bundles.validation`.

A task serves a float alpha table and, with BatchNorm, normalisation statistics
(:meth:`Bundle.task_tensors`). Format 3 may store the table as int8 codes with per-layer scales,
and may leave the statistics out when the basis holds a calibration pool: they are then computed
from the pool under the task's weights, once per opened bundle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from pathlib import Path

import torch
from torch import nn

from supsup_deploy import backbone
from supsup_deploy import data as datasets
from supsup_deploy.alpha_groups import as_grouped, gather_weight
from supsup_deploy.binary_masks import code_value_table, codes_from_packed, unpack_bits
from supsup_deploy.bundles.format import (
    BASIS_FILE,
    POOL_BATCH,
    TASKS_FOLDER,
    TaskEntry,
    TaskInfo,
    file_sha256,
    task_file_name,
)
from supsup_deploy.bundles.validation import (
    check_bundle_folder,
    check_listed_task,
    list_task_files,
    read_basis,
    read_task,
    read_version_1_tasks,
    stored_alpha,
    stored_signature,
)
from supsup_deploy.bundles.weights import TaskWeights
from supsup_deploy.errors import ConfigError
from supsup_deploy.models import MaskedModel, ModelConfig, build_model, masked_layers
from supsup_deploy.normalization import average_batch_statistics, load_norm_state, norm_state
from supsup_deploy.weight_sources import use_fixed

MAX_LISTED_TASKS = 10
"""Tasks named in the error for an unknown task."""


def load_bundle(path: str | Path) -> Bundle:
    """Open and validate a bundle folder.

    Args:
        path: the bundle folder.

    Returns:
        A :class:`Bundle`; ``bundle.task_entries`` lists the installed tasks (no task file is
        read yet), ``bundle.tasks`` reads and checks them all.

    Raises:
        FormatError: anything missing, corrupt, or inconsistent; the message names the file.

    Example:
        >>> bundle = load_bundle("artifacts/bundle")
        >>> model = bundle.model(bundle.tasks[0].index)
    """
    path = Path(path)
    check_bundle_folder(path)
    return Bundle(path)


def single_task_config(config: ModelConfig) -> ModelConfig:
    """A bundle's model config with one statistics slot: a bundle's model runs one task."""
    return dataclasses.replace(config, num_tasks=1)


class Bundle:
    """An opened bundle: its basis read and validated, its tasks listed. Use :func:`load_bundle`.

    A format 2 task file is read and checked the first time its task is used (:meth:`task`,
    :meth:`task_tensors`, :meth:`model`, ...) and then cached; :attr:`tasks` checks them all.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.basis_path = path / BASIS_FILE
        basis = read_basis(self.basis_path)
        self._header = basis.header
        self.metadata = basis.metadata
        self.format_version = basis.header.version
        self.config, self.summary = basis.header.config, basis.header.summary
        self.input, self.num_basis = basis.header.input, basis.header.num_basis
        self.dataset = basis.header.dataset  # the training dataset's name ("" when not recorded)
        self.basis_sha256 = file_sha256(self.basis_path)
        self._packed_masks = basis.packed_masks
        self.pool = basis.pool  # the calibration pool, uint8 [N, C, size, size], or None
        self._pool_statistics: dict[int, dict[str, torch.Tensor]] = {}
        self._task_folder = self.path / TASKS_FOLDER
        self._checked: dict[int, tuple[TaskInfo, dict[str, torch.Tensor]]] = {}
        if self.format_version >= 2:
            self._list_tasks(list_task_files(self._task_folder))
        else:
            self._checked = read_version_1_tasks(self._task_folder, self._header, self.basis_sha256)
            self._list_tasks({index: info.name for index, (info, _) in self._checked.items()})
        self._codes: dict[str, list[torch.Tensor]] = {}

    def _list_tasks(self, names: dict[int, str]) -> None:
        """Take ``names`` (task id: name) as the installed tasks."""
        self._names = names
        self._ids = {name: index for index, name in names.items()}
        self.__dict__.pop("task_entries", None)

    @functools.cached_property
    def task_entries(self) -> tuple[TaskEntry, ...]:
        """Every installed task as listed, by id, without reading its file."""
        return tuple(self._task_entry(index) for index in sorted(self._names))

    @property
    def tasks(self) -> list[TaskInfo]:
        """Every installed task by id, each read and checked (those not used yet are read now)."""
        return [self._checked_task(entry)[0] for entry in self.task_entries]

    @property
    def task_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors every task file of this bundle holds, by name: shape."""
        return self._header.task_tensor_shapes()

    def clashing_task(self, index: int, name: str) -> TaskEntry | None:
        """The installed task with this id or this name, if any (no file is read)."""
        if index in self._names:
            return self._task_entry(index)
        if name in self._ids:
            return self._task_entry(self._ids[name])
        return None

    def _task_entry(self, index: int) -> TaskEntry:
        name = self._names[index]
        file_name = task_file_name(index, name, version=self.format_version)
        return TaskEntry(index, name, self._task_folder / file_name)

    def _checked_task(self, entry: TaskEntry) -> tuple[TaskInfo, dict[str, torch.Tensor]]:
        """A listed task's file, read and checked on first use, then cached."""
        checked = self._checked.get(entry.index)
        if checked is None:
            checked = read_task(entry.path, self._header, self.basis_sha256)
            check_listed_task(checked[0], entry.index, entry.name)
            self._checked[entry.index] = checked
        return checked

    def check_task_file(self, file: Path) -> TaskInfo:
        """Validate a task file against this bundle's basis; raise FormatError naming it."""
        return read_task(file, self._header, self.basis_sha256)[0]

    def task(self, task: int | str) -> TaskInfo:
        """A task by id or name, read and checked on first use.

        An int or a string of digits is a task id (``7``, ``"7"``); any other string is a name
        (task names are never all digits).

        Raises:
            ConfigError: no such task (the message lists installed ones).
            FormatError: the task's file is corrupt or inconsistent.
        """
        return self._checked_task(self._entry(task))[0]

    def _entry(self, task: int | str) -> TaskEntry:
        by_name = isinstance(task, str) and not (task.isascii() and task.isdigit())
        if by_name:
            index = self._ids.get(task)
        else:
            index = int(task) if isinstance(task, str) else operator.index(task)
        if index is not None and index in self._names:
            return self._task_entry(index)
        shown = sorted(self._names)[:MAX_LISTED_TASKS]
        known = ", ".join(f"{index} ({self._names[index]})" for index in shown) or "none"
        if len(self._names) > len(shown):
            known += f" and {len(self._names) - len(shown)} more"
        wanted = f"named {task!r}" if by_name else f"with id {index}"
        raise ConfigError(f"no task {wanted} in {self.path}; installed tasks: {known}")

    def weights(self, task: int | str) -> TaskWeights:
        """One task as a torchvision-``Weights``-like object: class names, input transform, model.

        Args:
            task: task id or name.

        Returns:
            The task's :class:`~supsup_deploy.bundles.weights.TaskWeights`.

        Example:
            >>> weights = bundle.weights("t3")
            >>> model, preprocess = weights.model(), weights.transforms()
            >>> weights.class_names[int(model(preprocess(image).unsqueeze(0)).argmax())]
        """
        info = self.task(task)
        return TaskWeights(
            bundle=self,
            task=info.index,
            name=info.name,
            class_names=info.class_names,
            input=self.input,
        )

    def stored_tensors(self, task: int | str) -> dict[str, torch.Tensor]:
        """A task's tensors as its file stores them, read and checked on first use."""
        return dict(self._checked_task(self._entry(task))[1])

    def task_tensors(self, task: int | str) -> dict[str, torch.Tensor]:
        """A task's tensors as it serves: ``alpha`` (float ``[num_layers, G, |B|]``: coded tables
        times their scales, ``G = 1`` for an ungrouped table) and,
        with BatchNorm, ``norm.running_mean`` and ``norm.running_var`` (computed from the
        calibration pool, float32, when the file stores none)."""
        entry = self._entry(task)
        stored = self._checked_task(entry)[1]
        served = {"alpha": stored_alpha(stored, self.num_basis)}
        served |= {key: value for key, value in stored.items() if key.startswith("norm.")}
        if set(self.task_tensor_shapes) - set(served):
            if entry.index not in self._pool_statistics:
                self._pool_statistics[entry.index] = self.pool_statistics(served["alpha"])
            served |= self._pool_statistics[entry.index]
        return served

    def task_signature(self, task: int | str) -> torch.Tensor | None:
        """A task's signature as stored (float32 ``[2, SIGNATURE_SIZE]``: float16 values, or
        int8 codes times their scales; see :mod:`supsup_deploy.task_signatures`), or None when its
        file holds none."""
        return stored_signature(self._checked_task(self._entry(task))[1])

    def pool_statistics(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """The normalisation statistics an alpha table gets from the calibration pool.

        The pool's images, normalised as the bundle's inputs, run through the table's model in
        training mode, :data:`~supsup_deploy.bundles.format.POOL_BATCH` at a time in stored
        order; each statistic is the plain average of the batch statistics (the unbiased
        variance), in float32 on the CPU.

        Args:
            alpha: ``[num_layers, G, |B|]`` table (or ``[num_layers, |B|]``).

        Returns:
            ``norm.running_mean`` and ``norm.running_var``, float32.

        Raises:
            ConfigError: the bundle has no calibration pool.
        """
        if self.pool is None:
            raise ConfigError(f"{self.path} has no calibration pool (pack it with --pool)")
        model = build_model(single_task_config(self.config))
        use_fixed(model, self._materialize(alpha, "cpu", None))
        images = datasets.preprocess_images(self.pool, self.input)
        average_batch_statistics(model, 0, images.split(POOL_BATCH))
        return norm_state(model, 0)

    def packed_basis(self, layer: int) -> torch.Tensor:
        """The basis masks of one masked layer, bit-packed: uint8 ``[|B|, ceil(numel / 8)]``."""
        return self._packed_masks[layer]

    def basis_masks(self) -> list[list[torch.Tensor]]:
        """The basis masks unpacked: ``|B|`` sets of one bool mask per masked layer, shaped as
        the layer's weight (what :func:`~supsup_deploy.weight_sources.use_alpha` takes)."""
        masks: list[list[torch.Tensor]] = [[] for _ in range(self.num_basis)]
        for packed, shape in zip(self._packed_masks, self.summary.weight_shapes, strict=True):
            for number, row in enumerate(packed):
                masks[number].append(unpack_bits(row, math.prod(shape)).view(shape))
        return masks

    def codes(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Per-layer int32 codes (sign and basis bits), computed once per device."""
        key = str(torch.device(device))
        if key not in self._codes:
            codes = []
            for layer, (packed, shape) in enumerate(
                zip(self._packed_masks, self.summary.weight_shapes, strict=True)
            ):
                numel = math.prod(shape)
                negative = backbone.sign_bits(self.config.seed, layer, numel, device=device)
                codes.append(codes_from_packed(packed.to(device), negative, numel))
            self._codes[key] = codes
        return self._codes[key]

    def materialize(
        self,
        task: int | str,
        device: torch.device | str = "cpu",
        *,
        out: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Every masked layer's effective float32 weight for ``task``, bit-exact per the spec.

        Args:
            task: task id or name.
            device: where to build the weights.
            out: optional float32 tensors of the layers' shapes to write into (no allocation).

        Returns:
            One weight per masked layer (``out`` itself when given).
        """
        return self._materialize(self.task_tensors(task)["alpha"], device, out)

    def _materialize(self, alpha, device, out) -> list[torch.Tensor]:
        alpha = as_grouped(alpha).to(device=device, dtype=torch.float32)
        weights = []
        for layer, codes in enumerate(self.codes(device)):
            shape = self.summary.weight_shapes[layer]
            tables = code_value_table(
                alpha[layer], backbone.weight_constant(backbone.fan_in(shape))
            )
            weights.append(gather_weight(tables, codes, shape, None if out is None else out[layer]))
        return weights

    def model(self, task: int | str, *, device: torch.device | str = "cpu") -> MaskedModel:
        """An eval-mode model running ``task``, its weights materialised."""
        tensors = self.task_tensors(task)
        model = build_model(single_task_config(self.config)).to(device)
        use_fixed(model, self._materialize(tensors["alpha"], device, None))
        load_norm_state(model, 0, tensors)
        model.bundle_task = self.task(task).index
        return model.eval()

    @torch.no_grad()
    def switch(self, model: nn.Module, task: int | str) -> None:
        """Make a model from :meth:`model` run another task, in place (no rebuild)."""
        tensors = self.task_tensors(task)
        fixed = [layer.source.fixed for layer in masked_layers(model)]
        self._materialize(tensors["alpha"], fixed[0].device, fixed)
        load_norm_state(model, 0, tensors)
        model.bundle_task = self.task(task).index

    def refresh_tasks(self) -> None:
        """List ``tasks/`` again, taking in tasks installed since the bundle was opened (by
        :func:`supsup_deploy.learn.teach` or ``supsup add-task``)."""
        self._list_tasks(list_task_files(self._task_folder))

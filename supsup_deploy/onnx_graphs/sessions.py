"""ONNX Runtime sessions: open a graph on a device and run float32 images through it; the
shared graph's session (:class:`SharedGraph`), which runs any task, and its specialisation to one
task (the task's tensors as constants: a dense graph's speed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.devices import onnx_providers, resolve_device
from supsup_deploy.errors import FormatError, SupsupError
from supsup_deploy.onnx_graphs.format import (
    GRAPH_KIND,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    SHARED_FORMAT_VERSION,
)
from supsup_deploy.onnx_graphs.shared_graph import TaskInput, build_shared_graph, task_feed

SHARED_SESSION_DISABLED_OPTIMIZERS = ("ConstantFolding",)
"""Left out of the shared session: folding ``Cast(codes, int32)`` would hold the codes as int32,
4 bytes per weight instead of 1 or 2 (the cast at run time costs no measurable time)."""
SERVING_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
"""For sessions that share a process with many others (the shared session, specialised ones):
threads that spin for work after a run take the cores from the next run on another session
(a mixed stream over 34 open gem_resnet18 sessions: 0.086 s per request spinning, 0.025 s not)."""


def onnx_session(
    source: str | Path | bytes,
    *,
    device: str = "cpu",
    name: str | Path | None = None,
    disabled_optimizers: tuple[str, ...] = (),
    spinning: bool = True,
):
    """An ONNX Runtime session on ``device`` (see :func:`supsup_deploy.devices.resolve_device`;
    CUDA runs on that GPU index and needs onnxruntime-gpu).

    Args:
        source: the graph's file, or its bytes.
        device: where it runs.
        name: what the error message calls the graph (default ``source`` when it is a path).
        disabled_optimizers: ONNX Runtime graph optimizers to leave out.
        spinning: let the session's threads spin for work after a run (see
            :data:`SERVING_SESSION_CONFIG`).
    """
    import onnxruntime

    providers = onnx_providers(resolve_device(device))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        for key, value in SERVING_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
    graph = source if isinstance(source, bytes) else str(source)
    try:
        return onnxruntime.InferenceSession(
            graph, options, providers=providers, disabled_optimizers=list(disabled_optimizers)
        )
    except Exception as error:  # onnxruntime raises its own unexported exception types
        label = name or ("the graph" if isinstance(source, bytes) else source)
        raise SupsupError(f"{label}: ONNX Runtime cannot load it ({error})") from None


def run_onnx(session, images: torch.Tensor) -> np.ndarray:
    """Logits from an ONNX Runtime session for float32 images."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: images.detach().cpu().numpy().astype(np.float32)})[0]


class SharedGraph:
    """An ONNX Runtime session of a shared graph: runs any task, fed or as an adapter, and
    specialises a session to one task (:meth:`specialize`).

    The session keeps the codes in their own integer type (no constant folding): 1 or 2 bytes
    per masked weight once open. Its threads, and those of its specialised sessions, do not spin
    after a run (:data:`SERVING_SESSION_CONFIG`).

    Args:
        path: the shared graph (``model.onnx``); with ``model``, only the name messages use.
        device: ``"cpu"`` or ``"cuda"``.
        session: an ONNX Runtime session of ``path`` already open (else one is opened).
        model: the graph's bytes, for a graph that is not a file (else ``path`` is read).

    Raises:
        FormatError: the file is not a shared graph this version runs.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        session: Any = None,
        model: bytes | None = None,
    ) -> None:
        self.path = Path(path)
        self.model = model
        self.session = session or onnx_session(
            self.path if model is None else model,
            device=device,
            name=self.path,
            disabled_optimizers=SHARED_SESSION_DISABLED_OPTIMIZERS,
            spinning=False,
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
        if metadata.get("supsup.graph") != GRAPH_KIND:
            raise FormatError(f"{self.path}: not a shared graph (no supsup.graph metadata)")
        version = metadata.get("supsup.shared_format_version")
        if version != str(SHARED_FORMAT_VERSION):
            raise FormatError(
                f"{self.path}: shared graph format {version}, this version runs "
                f"{SHARED_FORMAT_VERSION}"
            )
        try:
            self.inputs = tuple(
                TaskInput(item["name"], item["dtype"], tuple(item["shape"]))
                for item in json.loads(metadata["supsup.task_inputs"])
            )
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(f"{self.path}: bad supsup.task_inputs metadata ({error})") from None
        self.basis_sha256 = metadata.get("supsup.basis_sha256", "")
        self.provider = self.session.get_providers()[0]

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str = "cpu") -> SharedGraph:
        """The bundle's shared graph built in memory (:func:`build_shared_graph`), no file."""
        return cls(
            bundle.path / f"{MODEL_FILE} (built in memory)",
            device=device,
            model=build_shared_graph(bundle).SerializeToString(),
        )

    def check_bundle(self, bundle: Bundle) -> None:
        """Raise FormatError unless the graph was exported from this bundle's basis."""
        if self.basis_sha256 != bundle.basis_sha256:
            raise FormatError(f"{self.path}: exported from another bundle (basis hash differs)")

    def feed(self, bundle: Bundle, task: int | str) -> dict[str, np.ndarray]:
        """A task's tensors from the bundle, as the graph's plain inputs."""
        return task_feed(bundle, task, self.inputs)

    def run(
        self,
        images: torch.Tensor | np.ndarray,
        *,
        feed: dict[str, np.ndarray] | None = None,
        adapter=None,
    ) -> np.ndarray:
        """Logits for float32 images under the task given as plain inputs or as an adapter.

        Args:
            images: ``[N, C, H, W]`` normalised images.
            feed: the task's tensors (:meth:`feed`).
            adapter: a :class:`supsup_deploy.onnx_graphs.adapters.TaskAdapter` to activate instead.

        Returns:
            ``[N, classes]`` float32 logits.
        """
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        inputs = {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32), **(feed or {})}
        options = adapter.run_options() if adapter is not None else None
        return self.session.run([OUTPUT_NAME], inputs, options)[0]

    def specialize(self, source: Bundle | Any, task: int | str | None = None):
        """An ONNX Runtime session of this graph for one task, its only input ``input``.

        The task's tensors become the graph's initializers, so ONNX Runtime computes the
        weights once, when the session opens, and optimises the network as it would a dense
        graph (constant folding, pre-packed weights). No file is written; the session runs on
        this graph's providers.

        Args:
            source: the bundle (then ``task`` names the task) or a
                :class:`supsup_deploy.onnx_graphs.adapters.TaskAdapter`.
            task: task id or name, with a bundle.

        Returns:
            An ``onnxruntime.InferenceSession``.

        Raises:
            FormatError: the bundle is not this graph's, or the tensors do not fit its inputs.
        """
        if isinstance(source, Bundle):
            self.check_bundle(source)
            return self.specialize_tensors(self.feed(source, task))
        return self.specialize_tensors(source.tensors)

    def specialize_tensors(self, tensors: dict[str, np.ndarray]):
        """:meth:`specialize` for a task's tensors already in the graph inputs' dtypes."""
        import onnx
        import onnxruntime
        from onnx import numpy_helper

        for spec in self.inputs:
            values = tensors.get(spec.name)
            if values is None or str(values.dtype) != spec.dtype or values.shape != spec.shape:
                raise FormatError(
                    f"{self.path}: a task's {spec.name} must be {spec.dtype} {list(spec.shape)}"
                )
        try:
            data = self.model if self.model is not None else self.path.read_bytes()
        except OSError as error:
            raise FormatError(f"{self.path}: cannot read the shared graph ({error})") from None
        model = onnx.load_from_string(data)
        graph = model.graph
        kept = [value for value in graph.input if value.name not in tensors]
        del graph.input[:]
        graph.input.extend(kept)
        for initializer in graph.initializer:
            if initializer.name in tensors:
                initializer.CopyFrom(
                    numpy_helper.from_array(tensors[initializer.name], initializer.name)
                )
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        for key, value in SERVING_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
        providers = self.session.get_providers()
        provider_options = self.session.get_provider_options()
        try:
            return onnxruntime.InferenceSession(
                model.SerializeToString(),
                options,
                providers=providers,
                provider_options=[provider_options.get(name, {}) for name in providers],
            )
        except Exception as error:  # onnxruntime raises its own unexported exception types
            raise SupsupError(f"{self.path}: ONNX Runtime cannot specialise it ({error})") from None

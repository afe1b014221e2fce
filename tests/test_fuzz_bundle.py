"""Hostile bundle files: every mutation loads exactly like the original or raises SupsupError.

Real bundles (packed, rice and sparse basis masks, packed from the tiny training run) are
changed one file or folder entry at a time: bit flips, truncation, spliced garbage, forged header
lengths, edits of the safetensors header (dtypes, shapes, offsets) and of the supsup metadata
(format 2 hashes it with the tensors, so an edit that is not resealed must be refused),
tensors swapped for ones of the wrong dtype or shape (with the content hashes recomputed so the
structural checks are reached), files made huge (sparse, so nothing is written), files of a
bundle with another seed or architecture, and garbage, duplicates, FIFOs and device links in
``tasks/``. Each load opens the bundle and reads every task (``bundle.tasks``), under a deadline
and a memory budget.

The default run tries two hundred cases; ``python -m pytest -m slow`` tries thousands.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import struct
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from typer.testing import CliRunner

from cli.main import app
from supsup_deploy.binary_masks import MAX_BASIS
from supsup_deploy.bundles.format import SIGNATURE_TENSOR, InputSpec, task_file_name
from supsup_deploy.bundles.reader import Bundle, load_bundle
from supsup_deploy.bundles.validation import MAX_MASKED_WEIGHTS
from supsup_deploy.bundles.writer import save_basis, save_task
from supsup_deploy.errors import FormatError, SupsupError
from supsup_deploy.mask_compression import decode_mask
from supsup_deploy.models import ModelConfig, summarize_model
from supsup_deploy.pack import pack_run

DEADLINE_S = 10
MEMORY_BUDGET = 128 << 20
ENCODINGS = ("packed", "rice", "sparse")
TARGETS = ("basis.safetensors", "tasks/0.task_0.safetensors", "tasks/2.task_2.safetensors")
FAST = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
SLOW = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# What a case may do when it loads: "same" (load exactly like the original), "anything" (hashes
# were recomputed: a well-formed different bundle is fine), or "error" (it must raise
# SupsupError).
EXPECTATIONS = ("same", "anything", "error")


class CaseTimeout(BaseException):
    """A load ran past the per-case deadline (BaseException so that no handler swallows it)."""


@dataclass(frozen=True)
class Original:
    """A pristine bundle folder and what loading it gives."""

    folder: Path
    strict: dict[str, Any]
    loose: list[tuple]


class Corpus:
    """The pristine bundles (one per mask encoding) and bundles of another seed and arch."""

    def __init__(self, originals: dict[str, Original], foreign: dict[str, Path]) -> None:
        self.originals = originals
        self.foreign = foreign

    def __repr__(self) -> str:
        return "Corpus(...)"


# --- reading and writing safetensors bytes without the package ---------------------------------


def split_file(data: bytes) -> tuple[dict, bytes]:
    """The JSON header and the tensor bytes of a well-formed safetensors file."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join_file(header: Any, body: bytes) -> bytes:
    """A safetensors file from a header (any JSON) and tensor bytes, padded like safetensors."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def content_hash(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """``supsup_sha256`` as docs/FORMAT.md defines it (written here, not imported)."""
    data = text.encode()
    digest = hashlib.sha256(f"{len(data)}|".encode() + data)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def edit_metadata(data: bytes, change) -> bytes:
    """Apply ``change(metadata)`` (in place) to a file's supsup metadata."""
    header, body = split_file(data)
    metadata = json.loads(header["__metadata__"]["supsup"])
    change(metadata)
    header["__metadata__"]["supsup"] = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    return join_file(header, body)


def seal(data: bytes) -> bytes:
    """Recompute the content hash of a file safetensors can still read; others stay as they are."""
    try:
        header, body = split_file(data)
        metadata = header["__metadata__"]
        metadata["supsup_sha256"] = content_hash(metadata["supsup"], load(data))
        return join_file(header, body)
    except Exception:  # a file safetensors or the JSON parser refuses is left unsealed
        return data


def rebind_tasks(folder: Path) -> None:
    """Point every task file at the (changed) basis, as a deliberate forger would."""
    digest = hashlib.sha256((folder / "basis.safetensors").read_bytes()).hexdigest()
    for path in (folder / "tasks").glob("*.safetensors"):
        edited = edit_metadata(
            path.read_bytes(), lambda metadata: metadata.update(basis_sha256=digest)
        )
        path.write_bytes(seal(edited))


def tree_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Key paths into a JSON tree (the root excluded), into the first two items of lists only."""
    children = node.items() if isinstance(node, dict) else list(enumerate(node))[:2]
    paths = []
    for key, child in sorted(children, key=lambda item: str(item[0])):
        paths.append((*prefix, key))
        if isinstance(child, (dict, list)):
            paths.extend(tree_paths(child, (*prefix, key)))
    return paths


def set_path(tree: Any, path: tuple, value: Any, delete: bool) -> None:
    """Set (or delete) ``path`` in a JSON tree."""
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if not delete:
        parent[path[-1]] = value
    elif isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        del parent[path[-1]]


# --- byte edits of one file ------------------------------------------------------------------


@dataclass(frozen=True)
class BitFlips:
    positions: tuple[int, ...]

    def __call__(self, data: bytes) -> bytes:
        flipped = bytearray(data)
        for position in self.positions:
            bit = position % (8 * len(data))
            flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)


@dataclass(frozen=True)
class Truncate:
    keep: int

    def __call__(self, data: bytes) -> bytes:
        return data[: self.keep % len(data)]


@dataclass(frozen=True)
class Splice:
    start: int
    removed: int
    inserted: bytes

    def __call__(self, data: bytes) -> bytes:
        start = self.start % len(data)
        return data[:start] + self.inserted + data[start + self.removed :]


@dataclass(frozen=True)
class HeaderLength:
    value: int

    def __call__(self, data: bytes) -> bytes:
        return self.value.to_bytes(8, "little") + data[8:]


@dataclass(frozen=True)
class HeaderField:
    """Change one entry of the safetensors header (a tensor or ``__metadata__``)."""

    pick: int
    field: str
    value: Any
    delete: bool = False

    def __call__(self, data: bytes) -> bytes:
        header, body = split_file(data)
        name = sorted(header)[self.pick % len(header)]
        if self.field == "entry":
            set_path(header, (name,), self.value, self.delete)
        elif self.field == "rename":
            header[str(self.value)] = header.pop(name)
        elif isinstance(header[name], dict):
            set_path(header, (name, self.field), self.value, self.delete)
        return join_file(header, body)


@dataclass(frozen=True)
class MetadataField:
    """Change, delete or add one node of the supsup metadata."""

    pick: int
    value: Any
    action: str

    def __call__(self, data: bytes) -> bytes:
        return edit_metadata(data, self._change)

    def _change(self, metadata: dict) -> None:
        paths = tree_paths(metadata)
        path = paths[self.pick % len(paths)]
        if self.action == "add":
            parent = metadata
            for key in path[:-1]:
                parent = parent[key]
            path = (*path[:-1], "unexpected_key") if isinstance(parent, dict) else path
        set_path(metadata, path, self.value, self.action == "delete")


@dataclass(frozen=True)
class MetadataText:
    """Replace the supsup metadata string with arbitrary text."""

    text: str

    def __call__(self, data: bytes) -> bytes:
        header, body = split_file(data)
        header["__metadata__"]["supsup"] = self.text
        return join_file(header, body)


# --- mutations of a bundle folder ------------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """Rewrite one file with a byte edit; ``sealed`` recomputes its hash and rebinds the tasks."""

    target: str
    edit: Any
    sealed: bool = False

    @property
    def expect(self) -> str:
        return "anything" if self.sealed else "same"

    def apply(self, folder: Path, corpus: Corpus) -> None:
        path = folder / self.target
        data = self.edit(path.read_bytes())
        path.write_bytes(seal(data) if self.sealed else data)
        if self.sealed and self.target == "basis.safetensors":
            rebind_tasks(folder)


@dataclass(frozen=True)
class ReplaceTensor:
    """Swap one tensor for one of the wrong dtype or shape (or drop or add one), hashes resealed.

    Every variant breaks a rule of docs/FORMAT.md, so the load must fail on it.
    """

    target: str
    pick: int
    kind: str
    expect = "error"

    def apply(self, folder: Path, corpus: Corpus) -> None:
        path = folder / self.target
        data = path.read_bytes()
        header, _ = split_file(data)
        tensors = load(data)
        names = sorted(tensors)
        if self.kind == "missing":  # a task may leave its signature out, so drop another
            names = [name for name in names if name != SIGNATURE_TENSOR]
        name = names[self.pick % len(names)]
        tensors = self._replaced(tensors, name)
        text = header["__metadata__"]["supsup"]
        digest = content_hash(text, tensors)
        path.write_bytes(save(tensors, metadata={"supsup": text, "supsup_sha256": digest}))
        if self.target == "basis.safetensors":
            rebind_tasks(folder)

    def _replaced(self, tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        tensor = tensors.pop(name)
        changes = {
            "scalar": lambda: tensor.reshape(-1)[0].clone(),
            "float64": lambda: tensor.to(torch.float64),
            "int32": lambda: tensor.to(torch.int32),
            "bool": lambda: tensor.to(torch.bool),
            "reshape": lambda: tensor.unsqueeze(0),
            "grow": lambda: torch.cat([tensor, tensor[:1]]),
            "empty": lambda: tensor[:0],
            "nan": lambda: _poisoned(tensor),
            "extra": lambda: tensor,
        }
        if self.kind != "missing":
            tensors[name] = changes[self.kind]()
        if self.kind == "extra":
            tensors["junk"] = torch.zeros(1, dtype=torch.uint8)
        return tensors


def _poisoned(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        return torch.cat([tensor, tensor[:1]])
    poisoned = tensor.clone()
    poisoned.view(-1)[0] = float("nan")
    return poisoned


@dataclass(frozen=True)
class Inflate:
    """Make the last tensor claim ``size`` bytes and the file that long (sparse, no writes)."""

    target: str
    size: int
    expect = "error"

    def apply(self, folder: Path, corpus: Corpus) -> None:
        path = folder / self.target
        header, body = split_file(path.read_bytes())
        entries = {key: value for key, value in header.items() if key != "__metadata__"}
        name = max(entries, key=lambda key: entries[key]["data_offsets"][1])
        begin = header[name]["data_offsets"][0]
        header[name] = {
            "dtype": "U8",
            "shape": [self.size],
            "data_offsets": [begin, begin + self.size],
        }
        data = join_file(header, body[:begin])
        path.write_bytes(data)
        os.truncate(path, len(data) + self.size)


@dataclass(frozen=True)
class Pad:
    """Extend a file with zeros (sparse)."""

    target: str
    extra: int
    expect = "same"

    def apply(self, folder: Path, corpus: Corpus) -> None:
        path = folder / self.target
        os.truncate(path, path.stat().st_size + self.extra)


@dataclass(frozen=True)
class Foreign:
    """Copy a file of another bundle (another seed or architecture) into this one."""

    source: str
    file: str
    destination: str
    expect = "error"

    def apply(self, folder: Path, corpus: Corpus) -> None:
        shutil.copyfile(corpus.foreign[self.source] / self.file, folder / self.destination)


@dataclass(frozen=True)
class TasksEntry:
    """Put something odd in ``tasks/``: garbage, a copy, a folder, a FIFO, a device link."""

    name: str
    kind: str
    expect = "same"

    def apply(self, folder: Path, corpus: Corpus) -> None:
        path = folder / "tasks" / self.name
        if path.is_file():
            path.unlink()
        make = {
            "empty": lambda: path.write_bytes(b""),
            "garbage": lambda: path.write_bytes(os.urandom(200)),
            "copy": lambda: shutil.copyfile(folder / "tasks" / "2.task_2.safetensors", path),
            "folder": lambda: path.mkdir(),
            "fifo": lambda: os.mkfifo(path),
            "zero device": lambda: path.symlink_to("/dev/zero"),
            "random device": lambda: path.symlink_to("/dev/urandom"),
            "dangling link": lambda: path.symlink_to(folder / "missing"),
            "link loop": lambda: path.symlink_to(path),
        }
        make[self.kind]()


@dataclass(frozen=True)
class TasksNotAFolder:
    """Replace the ``tasks`` folder by something else."""

    kind: str
    expect = "same"

    def apply(self, folder: Path, corpus: Corpus) -> None:
        path = folder / "tasks"
        shutil.rmtree(path)
        {
            "file": lambda: path.write_bytes(b"not a folder"),
            "zero device": lambda: path.symlink_to("/dev/zero"),
            "fifo": lambda: os.mkfifo(path),
        }[self.kind]()


# --- strategies --------------------------------------------------------------------------------

HUGE = [2**31, 2**32, 2**40, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 10**12]
NUMBERS = [0, -1, 1, 2, 3, 17, 1.5, -0.0, 1e308, float("nan"), float("inf"), 2**64, 10**40]
TEXTS = ["", "x", "[/x]", "task_1", "rice", "sparse", "resnet50", "F16", "\x00", "é" * 70]
CONTAINERS = [[], [1], [2, 2], {}, {"a": 1}, [[]], ["a", "b"]]
WEIRD = st.one_of(
    st.sampled_from([None, True, False, *NUMBERS, *HUGE, *TEXTS, *CONTAINERS]),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=6),
)
INTEGER_DTYPES = ["U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "BOOL"]
FLOAT_DTYPES = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "C64"]
DTYPES = st.sampled_from([*INTEGER_DTYPES, *FLOAT_DTYPES, "X", ""])
SHAPES = st.one_of(
    st.sampled_from([[], [0], [10**12], [2**63], [2**62, 4], [2**32, 2**32], [-1], [1, -1]]),
    st.lists(st.integers(-2, 2**64), max_size=4),
)
OFFSETS = st.one_of(
    st.sampled_from([[0, 2**63], [0, 2**64 - 1], [0, 10**12], [5, 0], [0], [0, 0, 0]]),
    st.lists(st.integers(-1, 2**64), max_size=3),
)
DEEP_JSON = "[" * 200_000 + "]" * 200_000
METADATA_TEXTS = st.one_of(
    st.sampled_from(
        [
            "",
            "null",
            "[]",
            "1",
            '"x"',
            "{",
            "NaN",
            DEEP_JSON,
            '{"format":"supsup-task"}',
            '{"a":' * 5000 + "1" + "}" * 5000,
            "1" * 5000,
        ]
    ),
    st.text(max_size=40),
)
TARGET = st.sampled_from(TARGETS)

BYTE_EDITS = st.one_of(
    st.builds(BitFlips, st.lists(st.integers(0, 2**24), min_size=1, max_size=8).map(tuple)),
    st.builds(Truncate, st.integers(0, 2**24)),
    st.builds(Splice, st.integers(0, 2**24), st.integers(0, 64), st.binary(max_size=64)),
    st.builds(
        HeaderLength,
        st.one_of(st.sampled_from([0, 1, 7, (1 << 20) + 1, *HUGE]), st.integers(0, 2**64 - 1)),
    ),
    st.builds(HeaderField, st.integers(0, 99), st.just("dtype"), DTYPES),
    st.builds(HeaderField, st.integers(0, 99), st.just("shape"), SHAPES),
    st.builds(HeaderField, st.integers(0, 99), st.just("data_offsets"), OFFSETS),
    st.builds(
        HeaderField, st.integers(0, 99), st.sampled_from(["dtype", "shape"]), WEIRD, st.booleans()
    ),
    st.builds(HeaderField, st.integers(0, 99), st.just("entry"), WEIRD, st.booleans()),
    st.builds(
        HeaderField,
        st.integers(0, 99),
        st.just("rename"),
        st.sampled_from(["alpha", "mask.999", "mask_sizes.000", "norm.running_var", "x"]),
    ),
)
METADATA_EDITS = st.one_of(
    st.builds(
        MetadataField, st.integers(0, 999), WEIRD, st.sampled_from(["set", "set", "delete", "add"])
    ),
    st.builds(MetadataText, METADATA_TEXTS),
)
FOREIGN_FILES = st.sampled_from(
    ["basis.safetensors", "tasks/0.task_0.safetensors", "tasks/5.task_5.safetensors"]
)
ENTRY_KINDS = ["empty", "garbage", "copy", "folder", "fifo", "zero device", "random device"]
REPLACEMENTS = st.sampled_from(
    ["scalar", "float64", "int32", "bool", "reshape", "grow", "empty", "nan", "missing", "extra"]
)
# Metadata edits and wrong tensors reach the most checks, so they are drawn most often.
MUTATIONS = st.one_of(
    st.builds(Rewrite, TARGET, METADATA_EDITS, st.booleans()),
    st.builds(Rewrite, TARGET, METADATA_EDITS, st.booleans()),
    st.builds(Rewrite, TARGET, METADATA_EDITS, st.booleans()),
    st.builds(Rewrite, TARGET, BYTE_EDITS, st.booleans()),
    st.builds(Rewrite, TARGET, BYTE_EDITS, st.booleans()),
    st.builds(ReplaceTensor, TARGET, st.integers(0, 99), REPLACEMENTS),
    st.builds(ReplaceTensor, TARGET, st.integers(0, 99), REPLACEMENTS),
    st.builds(Inflate, TARGET, st.sampled_from([1 << 21, 1 << 26, 1 << 31, 1 << 40])),
    st.builds(Pad, TARGET, st.sampled_from([1, 7, 8, 4096, 1 << 30, 1 << 40])),
    st.builds(Foreign, st.sampled_from(["seed", "arch"]), FOREIGN_FILES, st.sampled_from(TARGETS)),
    st.builds(
        TasksEntry,
        st.sampled_from(
            [
                "junk.safetensors",
                ".hidden.safetensors",
                "task_1.safetensors",
                "7.task_7.safetensors",
                "notes.txt",
            ]
        ),
        st.sampled_from([*ENTRY_KINDS, "dangling link", "link loop"]),
    ),
    st.builds(TasksNotAFolder, st.sampled_from(["file", "zero device", "fifo"])),
)
CASES = st.tuples(st.sampled_from(ENCODINGS), MUTATIONS)
CORRUPTIONS = st.tuples(
    st.sampled_from(ENCODINGS),
    st.one_of(
        st.builds(Rewrite, TARGET, st.builds(Truncate, st.integers(0, 2**24))),
        st.builds(Rewrite, TARGET, st.builds(HeaderLength, st.sampled_from(HUGE))),
        st.builds(ReplaceTensor, TARGET, st.integers(0, 99), st.sampled_from(["scalar", "grow"])),
        st.builds(Inflate, TARGET, st.sampled_from([1 << 31, 1 << 40])),
        st.builds(Foreign, st.sampled_from(["seed", "arch"]), FOREIGN_FILES, TARGET),
    ),
)


# --- the corpus ------------------------------------------------------------------------------


def fingerprint(bundle: Bundle) -> tuple[dict[str, Any], list[tuple]]:
    """What a load gives: tensors and basis (strict) and the task metadata (loose)."""
    codes = hashlib.sha256(b"".join(code.numpy().tobytes() for code in bundle.codes()))
    tasks = sorted(bundle.tasks, key=lambda info: info.name)
    strict = {
        "basis": (bundle.basis_sha256, bundle.config, bundle.input, bundle.num_basis),
        "codes": codes.hexdigest(),
        "tasks": [
            (info.name, info.path.name, content_hash("", bundle.task_tensors(info.index)))
            for info in tasks
        ],
    }
    loose = [
        (
            info.name,
            info.index,
            info.kind,
            info.class_names,
            json.dumps(info.metrics, sort_keys=True),
        )
        for info in tasks
    ]
    return strict, loose


def foreign_bundle(folder: Path, original: Bundle, **changes: Any) -> Path:
    """A bundle like ``original`` but with other model options (random masks, two tasks)."""
    config = ModelConfig.from_dict({**original.config.to_dict(), **changes})
    options = {key: value for key, value in config.to_dict().items() if key != "arch"}
    summary = summarize_model(config.arch, **options)
    generator = torch.Generator().manual_seed(1)
    basis = [
        [torch.rand(shape, generator=generator) < 0.5 for shape in summary.weight_shapes]
        for _ in range(original.num_basis)
    ]
    spec = InputSpec(**original.input.to_dict())
    digest = save_basis(folder / "basis.safetensors", config, basis, spec)
    channels = summary.norm_channels
    for index in (0, 5):
        save_task(
            folder / "tasks" / task_file_name(index, f"task_{index}"),
            index=index,
            name=f"task_{index}",
            alpha=torch.full((summary.masked_layers, original.num_basis), 0.5),
            norm_state={
                "norm.running_mean": torch.zeros(channels),
                "norm.running_var": torch.ones(channels),
            },
            class_names=original.tasks[0].class_names,
            basis_sha256=digest,
        )
    return folder


@pytest.fixture(scope="module")
def corpus(small_run, tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("fuzz")
    originals = {}
    for encoding in ENCODINGS:
        bundle = pack_run(small_run, root / encoding, mask_encoding=encoding)
        originals[encoding] = Original(bundle.path, *fingerprint(bundle))
    packed = load_bundle(root / "packed")
    foreign = {
        "seed": foreign_bundle(root / "seed", packed, seed=7),
        "arch": foreign_bundle(root / "arch", packed, width=0.25),
    }
    return Corpus(originals, foreign)


# --- running a case ----------------------------------------------------------------------------


@contextlib.contextmanager
def within_budget(seconds: float = DEADLINE_S, allowance: int = 0):
    """Fail a case that runs past ``seconds`` or allocates more than the budget plus allowance."""

    def expire(signum, frame):
        raise CaseTimeout(f"a load ran past {seconds} s")

    limit = MEMORY_BUDGET + allowance
    previous = signal.signal(signal.SIGALRM, expire)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert peak < limit, f"a load allocated {peak} bytes"
    assert rss_growth < limit, f"a load grew the process by {rss_growth} bytes"


def declared_mask_bytes(folder: Path) -> int:
    """Packed basis-mask bytes that the (maybe forged) basis metadata declares; 0 if it cannot.

    A forged but hash-consistent basis may declare a larger architecture than its masks were
    made for (a rice stream decodes the same for any longer layer), and then the load rightly
    needs that architecture's masks in memory: the budget allows twice that.
    """
    try:
        with open(folder / "basis.safetensors", "rb") as stream:
            header_size = int.from_bytes(stream.read(8), "little")
            metadata = json.loads(
                json.loads(stream.read(min(header_size, 1 << 20)))["__metadata__"]["supsup"]
            )
        options = dict(metadata["model"])
        summary = summarize_model(options.pop("arch"), **options)
        layers = [math.prod(shape) for shape in summary.weight_shapes]
        num_basis = metadata["num_basis"]
        if sum(layers) > MAX_MASKED_WEIGHTS or num_basis not in range(1, MAX_BASIS + 1):
            return 0
        return num_basis * sum((numel + 7) // 8 for numel in layers)
    except Exception:  # an unreadable or nonsensical declaration earns no allowance
        return 0


def outcome(folder: Path) -> tuple[dict[str, Any], list[tuple]] | None:
    """The fingerprint of the loaded bundle (every task read), or None when loading or reading
    a task raised the package's own error."""
    with within_budget(allowance=2 * declared_mask_bytes(folder)):
        try:
            return fingerprint(load_bundle(folder))
        except SupsupError:
            return None


@contextlib.contextmanager
def mutated(corpus: Corpus, encoding: str, mutation) -> Path:
    """A scratch copy of the original bundle with ``mutation`` applied."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "bundle"
        shutil.copytree(corpus.originals[encoding].folder, folder)
        mutation.apply(folder, corpus)
        yield folder


def check_case(corpus: Corpus, encoding: str, mutation) -> None:
    """Load a mutated bundle and hold the result to the mutation's expectation."""
    assert mutation.expect in EXPECTATIONS
    with mutated(corpus, encoding, mutation) as folder:
        loaded = outcome(folder)
        if loaded is None or mutation.expect == "anything":
            return
        assert mutation.expect != "error", "the load should have failed"
        strict, loose = loaded
    original = corpus.originals[encoding]
    assert strict == original.strict, "loaded, but not as the original"
    if mutation.expect == "same":
        assert loose == original.loose, "loaded, but with other task metadata"


# --- the tests ---------------------------------------------------------------------------------


@FAST
@given(case=CASES)
@example(case=("packed", Rewrite("basis.safetensors", HeaderLength(2**63))))
@example(case=("rice", Rewrite("tasks/2.task_2.safetensors", HeaderField(0, "shape", [10**12]))))
@example(case=("rice", Inflate("basis.safetensors", 1 << 40)))
@example(case=("packed", Inflate("tasks/0.task_0.safetensors", 1 << 31)))
@example(case=("sparse", Pad("basis.safetensors", 1 << 40)))
@example(case=("packed", Rewrite("tasks/2.task_2.safetensors", MetadataText(DEEP_JSON))))
@example(case=("rice", Rewrite("basis.safetensors", MetadataField(0, 2**63, "set"), True)))
@example(case=("packed", ReplaceTensor("tasks/2.task_2.safetensors", 0, "scalar")))
@example(case=("sparse", ReplaceTensor("basis.safetensors", 1, "scalar")))
@example(
    case=("packed", Foreign("seed", "tasks/0.task_0.safetensors", "tasks/0.task_0.safetensors"))
)
@example(case=("packed", Foreign("arch", "basis.safetensors", "basis.safetensors")))
@example(case=("packed", TasksEntry("junk.safetensors", "fifo")))
@example(case=("packed", TasksEntry("junk.safetensors", "zero device")))
@example(case=("packed", TasksEntry("notes.txt", "garbage")))
@example(case=("packed", TasksNotAFolder("file")))
def test_hostile_files_load_like_the_original_or_raise(corpus, case):
    check_case(corpus, *case)


@pytest.mark.slow
@SLOW
@given(case=CASES)
def test_hostile_files_load_like_the_original_or_raise_thoroughly(corpus, case):
    check_case(corpus, *case)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=CORRUPTIONS)
def test_inspect_reports_a_corrupt_bundle_in_one_line(corpus, case):
    encoding, mutation = case
    with mutated(corpus, encoding, mutation) as folder:
        result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


METADATA_CHANGES = [
    ("tasks/0.task_0.safetensors", {"kind": "alpha"}),
    ("tasks/2.task_2.safetensors", {"index": 3}),
    ("tasks/2.task_2.safetensors", {"name": "task_3"}),
    ("tasks/2.task_2.safetensors", {"class_names": ["a", "b", "c"]}),
    ("tasks/2.task_2.safetensors", {"extra": {"metrics": {"test_accuracy": 1.0}}}),
    ("basis.safetensors", {"extra": {"dataset": "mnist"}}),
    ("basis.safetensors", {"num_tasks_note": 1}),
]


@pytest.mark.parametrize(("target", "change"), METADATA_CHANGES)
def test_edited_metadata_is_refused(corpus, target, change):
    """Format 2 hashes the whole metadata: an edited id, kind or class name does not load."""
    edit = Rewrite(target, lambda data: edit_metadata(data, lambda meta: meta.update(change)))
    with (
        mutated(corpus, "packed", edit) as folder,
        pytest.raises(FormatError, match=f"{target}: content hash mismatch"),
    ):
        len(load_bundle(folder).tasks)


def test_an_uncaught_exception_fails_the_check(corpus, monkeypatch):
    def broken(path):
        raise ValueError("not the package's own error")

    monkeypatch.setitem(globals(), "load_bundle", broken)
    with pytest.raises(ValueError, match="own error"):
        check_case(corpus, "packed", TasksEntry("notes.txt", "garbage"))


def test_the_budget_catches_hangs_and_blowups():
    with pytest.raises(CaseTimeout), within_budget(seconds=0.05):
        time.sleep(1)
    with pytest.raises(AssertionError, match="allocated"), within_budget():
        bytearray(MEMORY_BUDGET + 1)


def test_a_rice_stream_whose_gaps_overflow_is_refused():
    """Its second gap, 2**64 - 51, wraps int64 to -51: a naive decoder would set bit 50."""
    numel, k, quotient, remainder = 100, 40, 2**24 - 1, 2**40 - 51
    unary = np.zeros(quotient + 2, dtype=np.uint8)
    unary[[0, -1]] = 1
    unary_bytes = np.packbits(unary, bitorder="little").tobytes()
    remainder_bits = np.concatenate([np.zeros(k, np.int64), (remainder >> np.arange(k)) & 1])
    stream = (
        struct.pack("<QBQ", 2, k, len(unary_bytes))
        + unary_bytes
        + np.packbits(remainder_bits.astype(np.uint8), bitorder="little").tobytes()
    )
    with pytest.raises(FormatError, match="gap"):
        decode_mask(stream, numel, "rice")

"""Format 1 bundles for the tests: a format 2 bundle rewritten the way the format 1 writer wrote.

Format 1 files hold their metadata under the single header key ``"supsup"``, with
``format_version`` 1 and ``tensors_sha256`` (a hash of the tensors only); task files are named
``tasks/<name>.safetensors``. Written with safetensors and hashlib only, not the library.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Format 1's ``tensors_sha256``: every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return load_file(path), json.loads(header["__metadata__"]["supsup"])


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    save_file(tensors, path, metadata={"supsup": text})


def version_1_task(path: Path, out: Path, basis_sha256: str) -> None:
    """A format 2 task file rewritten as format 1, recording ``basis_sha256`` (a format 3
    signature, which format 1 cannot hold, left out; a format 4 table of one row per layer as
    ``[L, |B|]``)."""
    tensors, metadata = read(path)
    tensors.pop("signature", None)
    tensors.pop("signature.scale", None)
    tensors["alpha"] = tensors["alpha"].flatten(0, -2)
    metadata.update(format_version=1, basis_sha256=basis_sha256)
    metadata["tensors_sha256"] = tensors_sha256(tensors)
    write(out, tensors, metadata)


def version_1_bundle(source: Path, out: Path) -> Path:
    """Write ``out``, a format 1 copy of the format 2 bundle ``source``."""
    (out / "tasks").mkdir(parents=True)
    tensors, metadata = read(source / "basis.safetensors")
    metadata.update(format_version=1, tensors_sha256=tensors_sha256(tensors))
    write(out / "basis.safetensors", tensors, metadata)
    digest = hashlib.sha256((out / "basis.safetensors").read_bytes()).hexdigest()
    for path in sorted((source / "tasks").glob("*.safetensors")):
        name = read(path)[1]["name"]
        version_1_task(path, out / "tasks" / f"{name}.safetensors", digest)
    return out

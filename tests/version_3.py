"""Format 3 bundles for the tests: a format 4 bundle of one-row tables rewritten as format 3.

Format 3 differs only in the alpha table's shape (``[L, |B|]``, scales ``[L]``, no int4) and
in signatures (float16 only), so the rewrite sets ``format_version`` to 3, drops the rows
dimension, stores an int8 signature as the float16 values it serves and seals each file again.
"""

from pathlib import Path

from supsup_deploy.bundles.format import file_sha256, save_sealed
from supsup_deploy.bundles.validation import stored_signature
from supsup_deploy.files import read_safetensors


def _read(path: Path):
    stored = read_safetensors(path, max_bytes=lambda _: 1 << 30)
    return dict(stored.tensors), dict(stored.metadata)


def version_3_bundle(source: Path, out: Path) -> Path:
    """Write ``out``, a format 3 copy of the format 4 bundle ``source`` (one row per layer)."""
    (out / "tasks").mkdir(parents=True)
    tensors, metadata = _read(source / "basis.safetensors")
    save_sealed(out / "basis.safetensors", tensors, {**metadata, "format_version": 3})
    digest = file_sha256(out / "basis.safetensors")
    for path in sorted((source / "tasks").glob("*.safetensors")):
        tensors, metadata = _read(path)
        assert tensors["alpha"].shape[1] == 1, "format 3 holds one row per layer"
        tensors["alpha"] = tensors["alpha"][:, 0].contiguous()
        if "alpha.scale" in tensors:
            tensors["alpha.scale"] = tensors["alpha.scale"][:, 0].contiguous()
        if "signature.scale" in tensors:
            tensors["signature"] = stored_signature(tensors).half()
            del tensors["signature.scale"]
        metadata.update(format_version=3, basis_sha256=digest)
        save_sealed(out / "tasks" / path.name, tensors, metadata)
    return out

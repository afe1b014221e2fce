"""docs/FORMAT.md is complete: numpy + safetensors + the page rebuild every task's weights.

The reading side uses only numpy, safetensors and tests/spec_reference.py (written from the page);
the library only writes the bundles and provides the weights compared against.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import spec_reference
import torch
from architecture_appendix import architecture_appendix
from safetensors import safe_open
from safetensors.numpy import load_file

from supsup_deploy import get_model
from supsup_deploy.alpha_codes import alpha_dtype_name, encode_alpha, quantize_alpha
from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import save_basis, save_task
from supsup_deploy.errors import FormatError
from supsup_deploy.mask_compression import decode_mask, encode_mask
from supsup_deploy.models import list_models, masked_layers, summarize_model
from supsup_deploy.pack import pack_run


def read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A format 2, 3 or 4 file's tensors and metadata, its content hash checked as the page says."""
    with safe_open(str(path), framework="numpy") as handle:
        header = handle.metadata()
    assert sorted(header) == ["supsup", "supsup_sha256"]
    tensors = load_file(str(path))
    assert spec_reference.content_sha256(header["supsup"], tensors) == header["supsup_sha256"]
    return tensors, json.loads(header["supsup"])


def check_bundle_against_spec(path: Path) -> int:
    basis, basis_meta = read(path / "basis.safetensors")
    assert basis_meta["format"] == "supsup-basis" and basis_meta["format_version"] == 4
    assert basis_meta["sign_hash"] == "mix32x2-v1"
    basis_sha = hashlib.sha256((path / "basis.safetensors").read_bytes()).hexdigest()
    seed = basis_meta["model"]["seed"]
    library = load_bundle(path)
    checked = 0
    for task_file in sorted((path / "tasks").glob("*.safetensors")):
        tensors, meta = read(task_file)
        assert meta["format"] == "supsup-task" and meta["basis_sha256"] == basis_sha
        assert task_file.name == f"{meta['index']}.{meta['name']}.safetensors"
        alpha = spec_reference.alpha_table(tensors, basis_meta["num_basis"])
        expected = library.materialize(meta["index"])
        for layer, info in enumerate(basis_meta["layers"]):
            weight = spec_reference.effective_weight(
                seed,
                layer,
                info["shape"],
                spec_reference.basis_rows(basis, basis_meta, layer),
                alpha[layer],
            )
            got = expected[layer].numpy()
            assert got.shape == weight.shape
            assert np.array_equal(got.view(np.uint32), weight.view(np.uint32)), (task_file, layer)
        checked += 1
    return checked


@pytest.mark.parametrize("encoding", ["packed", "rice", "sparse"])
def test_synthetic_bundle_matches_spec(tmp_path, encoding):
    model = get_model("gem_resnet18", num_classes=3, in_channels=1, seed=12345, width=0.5)
    generator = torch.Generator().manual_seed(0)
    layers = masked_layers(model)
    basis = [
        [torch.rand(layer.weight_shape, generator=generator) < density for layer in layers]
        for density in (0.05, 0.5, 0.9)
    ]
    spec = InputSpec(size=28, channels=1, mean=(0.286,), std=(0.353,))
    pool = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=generator)
    digest = save_basis(
        tmp_path / "basis.safetensors", model.config, basis, spec, encoding=encoding, pool=pool
    )
    channels = sum(m.num_features for m in model.modules() if hasattr(m, "running_mean"))
    norm = {"norm.running_mean": torch.randn(channels), "norm.running_var": torch.rand(channels)}
    codes, scale = quantize_alpha(torch.randn(len(layers), 3, generator=generator))
    grouped = torch.randn(len(layers), 3, 3, generator=generator)
    nibbles, nibble_scale = encode_alpha(grouped, "int4")
    tables = {
        "one_hot": (torch.eye(3)[[1] * len(layers)], None, norm),
        "mixed": (torch.randn(len(layers), 3, generator=generator), None, norm),
        "half": (torch.randn(len(layers), 3, generator=generator).half(), None, norm),
        "int8": (codes, scale, norm),
        "int8_pool": (codes, scale, {}),
        "grouped": (grouped, None, norm),
        "int4_grouped": (nibbles, nibble_scale, {}),
        "int8_grouped": (*encode_alpha(grouped[:, :2], "int8"), {}),
    }
    for index, (name, (alpha, alpha_scale, norm_state)) in enumerate(tables.items()):
        save_task(
            tmp_path / "tasks" / f"{index}.{name}.safetensors",
            index=index,
            name=name,
            alpha=alpha,
            alpha_scale=alpha_scale,
            norm_state=norm_state,
            class_names=["a", "b", "c"],
            basis_sha256=digest,
        )
    assert check_bundle_against_spec(tmp_path) == 8


@pytest.mark.parametrize("alpha_dtype", ["float32", "float16", "int8", "int4"])
def test_packed_run_matches_spec(small_run, tmp_path, alpha_dtype):
    bundle = pack_run(small_run, tmp_path / "bundle", alpha_dtype=alpha_dtype)
    stored = [alpha_dtype_name(bundle.stored_tensors(i.index)["alpha"]) for i in bundle.tasks]
    assert stored == ["float32", "float32", alpha_dtype]
    assert check_bundle_against_spec(tmp_path / "bundle") == 3


@pytest.mark.parametrize("name", ["basis.safetensors"])
def test_header_is_canonical_json(small_run, tmp_path, name):
    pack_run(small_run, tmp_path / "bundle")
    data = (tmp_path / "bundle" / name).read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    inner = header["__metadata__"]["supsup"]
    assert inner == json.dumps(json.loads(inner), sort_keys=True, separators=(",", ":"))


HOSTILE_SPARSE = [
    b"",
    b"\x01d",
    b"\x01d\x00",
    b"\x01e\x00",
    b"\x11d\x00",
    b"\x21d\x00",
    b"\x09d\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    b"\x01d\xa1d\x00",
    b"\x01d\xa1c\x00",
    b"\x01d\xa2\x05\x05\x00",
    b"\x01d\xa2\x05\x03\x00junk",
    b"\x01d\x0d" + b"\xff" * 13 + b"\x00",
    b"\x01d\x0d" + b"\x00" * 12 + b"\x0f\x00",
    b"\x01d\x0e" + b"\x00" * 14 + b"\x00",
    b"\x01d\x0c" + b"\x00" * 12 + b"\x01\x01\x00",
    b"\x01d\xa0\x01\x01\x00",
    b"\x01d\xa0\xa0\xa0\xa0\xa0\x00",
    b"\x01d\xc0\x00",
    b"\x01d\xc5\x00",
    b"\x01d\xc2\x01\x05\x00\x00",
    b"\x01d\xc2\x01\x05\x01\x00",
    b"\x01d\xc2\x02\x05\x00",
    b"\x01d\xc4",
]


def spec_sparse(data: bytes, numel: int) -> bytes | None:
    try:
        return spec_reference.sparse_decode(data, numel).tobytes()
    except (ValueError, IndexError):
        return None


def library_sparse(data: bytes, numel: int) -> bytes | None:
    try:
        return decode_mask(data, numel, "sparse").tobytes()
    except FormatError:
        return None


@pytest.mark.parametrize("numel", [1, 100, 257, 70_000, 3_000_000])
@pytest.mark.parametrize("density", [0.0, 1e-5, 0.003, 0.05, 0.5, 1.0])
def test_sparse_streams_decode_as_the_page_says(numel, density):
    """bitarray's sc_encode output, read by the page's algorithm and by the library."""
    generator = np.random.default_rng(int(density * 1e6) + numel)
    packed = np.packbits(generator.random(numel) < density, bitorder="little")
    stream = encode_mask(packed, numel, "sparse")
    assert spec_sparse(stream, numel) == packed.tobytes() == library_sparse(stream, numel)


@pytest.mark.parametrize("stream", HOSTILE_SPARSE)
def test_hostile_sparse_streams_are_read_alike(stream):
    assert spec_sparse(stream, 100) == library_sparse(stream, 100)


def test_the_architecture_appendix_is_current():
    """docs/ARCHITECTURES.md lists what the registry builds; regenerate it when this fails."""
    page = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURES.md"
    assert page.read_text() == architecture_appendix(), (
        "run: python -m tests.architecture_appendix > docs/ARCHITECTURES.md"
    )


@pytest.mark.parametrize("arch", list_models())
def test_the_classifier_is_as_the_page_says(arch):
    """The last layer's c_out is num_classes: linear [c, c_in], or gem_resnet18's 1x1 conv."""
    summary = summarize_model(arch, num_classes=7)
    shape = summary.weight_shapes[-1]
    assert shape[0] == 7
    if arch == "gem_resnet18":
        assert shape == (7, 160, 1, 1)
    else:
        assert len(shape) == 2

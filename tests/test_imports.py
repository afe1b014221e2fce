"""Imports only point down: no import circle, and no module imports a module of a higher layer.

Every ``import`` line of every module of ``supsup_deploy/`` and ``cli/`` counts, function-local
and ``TYPE_CHECKING`` ones included. ``LAYERS`` is the order, from data at the bottom to the
command line at the top (``docs/ARCHITECTURE.md`` lists it); a module may import modules of its
own layer or of lower ones, never of a higher one.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"supsup_deploy": "supsup_deploy", "cli": "supsup_cli"}
"""Source folder: the package it installs as."""

LAYERS = (
    (
        "foundation",
        "errors locking files outputs devices steps backbone binary_masks alpha_codes alpha_groups "
        "mask_compression normalization data images image_folder hot_tasks",
    ),
    (
        "models",
        "masked_layers weight_sources models models._api models.config models.interface "
        "models.resnet",
    ),
    (
        "formats",
        "bundles bundles.format bundles.validation bundles.writer bundles.weights bundles.reader "
        "train_config runs synthetic task_signatures",
    ),
    ("training", "train pack learn"),
    (
        "onnx",
        "onnx_graphs onnx_graphs.format onnx_graphs.targets onnx_graphs.task_graph "
        "onnx_graphs.shared_graph onnx_graphs.adapters onnx_graphs.sessions onnx_graphs.parity "
        "onnx_graphs.export",
    ),
    ("runtime", "runtime predictor stem_statistics task_inference_methods task_inference"),
    ("workflows", "report verify demo __init__"),
    (
        "cli",
        "cli.__init__ cli._choices cli._common cli._progress cli._task_auto cli.models cli.train "
        "cli.bundle cli.export cli.infer cli.demo cli.learn cli.reports cli.verify cli.main",
    ),
    ("entry points", "__main__ cli.__main__"),
)
"""Layers from the bottom up: modules by their path under ``supsup_deploy/`` (``cli.`` for
``cli/``), a package by its folder's name, the library's own ``__init__`` by that name."""


def module_files() -> dict[str, Path]:
    """Every module by its import name (``supsup_cli`` for ``cli/``)."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def layer_of() -> dict[str, int]:
    """Each module's layer number, by import name."""
    layers = {}
    for number, (_, names) in enumerate(LAYERS):
        for name in names.split():
            if name == "__init__":
                module = "supsup_deploy"
            elif name.startswith("cli."):
                module = "supsup_cli" + name[3:].removeprefix(".__init__")
            else:
                module = f"supsup_deploy.{name}"
            assert module not in layers, f"{name} is in two layers"
            layers[module] = number
    return layers


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """The project's own modules each module imports (``from a import b`` names ``a.b`` when
    that is a module, else ``a``)."""

    def known(name: str | None) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets |= {
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base)
                    for alias in node.names
                }
        graph[module] = targets - {None, module}
    return graph


def test_every_module_has_a_layer():
    modules, layers = module_files(), layer_of()
    assert sorted(set(modules) - set(layers)) == [], "modules missing from LAYERS"
    assert sorted(set(layers) - set(modules)) == [], "LAYERS names modules that do not exist"


def test_no_import_points_up():
    layers = layer_of()
    upward = [
        f"{module} ({LAYERS[layers[module]][0]}) imports {target} ({LAYERS[layers[target]][0]})"
        for module, targets in sorted(imports(module_files()).items())
        for target in sorted(targets)
        if layers[target] > layers[module]
    ]
    assert upward == []


def test_no_import_circle():
    graph = imports(module_files())
    state: dict[str, str] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []

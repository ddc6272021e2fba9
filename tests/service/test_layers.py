"""service/ by layer: every import of the server's own modules points down (README "service/"), and the client side
imports nothing of the server."""

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"

# Lower imports nothing above it. The client side (client, cli) sits apart: it may use only schemas (the wire format).
LAYERS = {"schemas": 0, "process": 1, "core": 2, "doors": 3, "app": 4, "__main__": 5}
CLIENT_SIDE = {"client", "cli"}


def layer_of(module: str) -> str:
    """``service.core.pipeline`` -> ``core``; ``service.app`` -> ``app``."""
    return module.split(".")[1]


def service_imports(path: Path) -> set[str]:
    """The ``service.*`` modules a file imports (``from service.core import models`` counts as ``service.core``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            found.add(node.module if "." in node.module else f"service.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("service."))
    return found


def modules() -> dict[str, Path]:
    files = {}
    for path in SERVICE.rglob("*.py"):
        parts = path.relative_to(SERVICE.parent).with_suffix("").parts
        if parts[-1] != "__init__":
            files[".".join(parts)] = path
    return files


def test_every_module_belongs_to_a_layer_or_the_client_side():
    assert {layer_of(name) for name in modules()} <= set(LAYERS) | CLIENT_SIDE


def test_the_server_imports_only_downwards():
    upward = []
    for name, path in modules().items():
        if layer_of(name) in CLIENT_SIDE:
            continue
        for imported in service_imports(path):
            target = layer_of(imported)
            if target in CLIENT_SIDE or LAYERS[target] > LAYERS[layer_of(name)]:
                upward.append(f"{name} imports {imported}")
    assert not upward


def test_the_client_side_imports_only_the_wire_format():
    found = {
        f"{name} imports {imported}"
        for name, path in modules().items()
        if layer_of(name) in CLIENT_SIDE
        for imported in service_imports(path)
        if layer_of(imported) not in CLIENT_SIDE | {"schemas"}
    }
    assert not found


def test_the_layers_are_folders_of_the_package():
    for folder in ("doors", "core", "process"):
        assert (SERVICE / folder / "__init__.py").is_file()
        assert list((SERVICE / folder).glob("[!_]*.py"))

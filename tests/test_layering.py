"""One-way house: a module imports only from its own layer or the layers below (docs/architecture.md).

Every import is checked, including those inside functions (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

import diffprobe

PACKAGE = Path(diffprobe.__file__).parent

# longest prefix wins; a higher number is a higher layer
LAYERS = {
    "diffprobe": 0, "diffprobe.errors": 0, "diffprobe.utils": 0, "diffprobe.paths": 0, "diffprobe.locking": 0,
    "diffprobe.parallel": 0, "diffprobe.devices": 0, "diffprobe.host_allocator": 0, "diffprobe.diffusion.schedule": 0,
    "diffprobe.io": 1, "diffprobe.dataset": 2, "diffprobe.phantoms": 3, "diffprobe.preprocessing": 3,
    "diffprobe.fingerprint": 4, "diffprobe.planning": 5, "diffprobe.preprocessing.access": 6,
    "diffprobe.models": 7, "diffprobe.bpr": 7, "diffprobe.diffusion": 7, "diffprobe.training": 7,
    "diffprobe.guidance": 8, "diffprobe.pretraining": 9, "diffprobe.probe": 10, "diffprobe.evaluation": 11,
    "diffprobe.overlays": 11, "diffprobe.postprocessing": 11, "diffprobe.predict": 12, "diffprobe.workflows": 13,
    "diffprobe.cli": 14,
    "diffprobe.__main__": 15,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"{module} has no layer in LAYERS")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffprobe"):
            folder = PACKAGE.parent / node.module.replace(".", "/")
            submodules = [f"{node.module}.{a.name}" for a in node.names
                          if (folder / f"{a.name}.py").is_file() or (folder / a.name / "__init__.py").is_file()]
            # `from pkg import submodule` depends on the submodule (package __init__s stay import-free)
            out.extend(submodules if len(submodules) == len(node.names) else [node.module, *submodules])
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names if a.name.startswith("diffprobe"))
    return out


def test_imports_go_down_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for target in imports(path):
            if layer(target) > layer(here):
                upward.append(f"{here} (layer {layer(here)}) imports {target} (layer {layer(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_file_over_400_lines():
    long = [f"{p.relative_to(PACKAGE)}: {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long

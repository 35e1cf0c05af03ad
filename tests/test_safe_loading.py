"""Nothing diffprobe reads can run code or make it read outside the folder it was pointed at.

- a source scan (ast) of the package: every ``torch.load`` passes ``weights_only=True``; no
  ``eval``/``exec``, no pickle-family modules, no ``np.load(..., allow_pickle=True)``, no
  unsafe ``yaml.load``;
- dataset.json's nnU-Net ``dataset`` file listing cannot point outside the dataset folder.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from conftest import make_raw_dataset

import diffprobe
from diffprobe.dataset import list_cases, load_dataset_json
from diffprobe.errors import DiffprobeError
from diffprobe.fingerprint import compute_fingerprint

PACKAGE = Path(diffprobe.__file__).parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for Attribute(Name('torch'), 'load'); '' for anything not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe load / code-execution site in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> dotted origin ("load" -> "torch.load", "np" -> "numpy")
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{filename}:{node.lineno}: imports from {node.module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{filename}:{node.lineno}"
        if full in ("torch.load", "torch.serialization.load") and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True")
        elif full in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: {full}()")
        elif full in ("numpy.load", "np.load") and _keyword(node, "allow_pickle") is not None and \
                not _is_const(_keyword(node, "allow_pickle"), False):
            found.append(f"{where}: np.load with allow_pickle")
        elif full in ("pandas.read_pickle", "pd.read_pickle", "yaml.unsafe_load", "torch.jit.load"):
            found.append(f"{where}: {full}()")
        elif full == "yaml.load" and "Safe" not in ast.unparse(_keyword(node, "Loader") or ast.Constant(None)):
            found.append(f"{where}: yaml.load without a SafeLoader")
    return found


def test_package_has_no_unsafe_loads() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the scan really sees the package
    found = [hit for f in files
             for hit in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))]
    assert found == []


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import torch as T\nT.load(p, map_location='cpu')",
    "from torch import load\nload(p)",
    "eval(text)",
    "exec(code)",
    "import pickle",
    "from joblib import load",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "import numpy\nnumpy.load(p, allow_pickle=flag)",
    "import yaml\nyaml.load(f)",
])
def test_scan_catches(source: str) -> None:
    """The scanner is not vacuous: each of these is reported."""
    assert len(unsafe_calls(source)) == 1


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "model.eval()",
    "import numpy as np\nnp.load(p)",
    "import numpy as np\nnp.load(p, allow_pickle=False)",
    "import yaml\nyaml.load(f, Loader=yaml.SafeLoader)",
])
def test_scan_accepts_safe_code(source: str) -> None:
    assert unsafe_calls(source) == []


# ---- dataset.json "dataset" listing ---------------------------------------------------------
def _with_listing(folder: Path, listing: dict) -> None:
    ds = json.loads((folder / "dataset.json").read_text())
    ds["dataset"] = listing
    (folder / "dataset.json").write_text(json.dumps(ds))


def test_listing_inside_the_folder_is_used(roots: dict[str, Path]) -> None:
    """Files listed anywhere inside the dataset folder (even via an inner symlink) are the training cases."""
    folder = make_raw_dataset(roots["raw"])
    (folder / "scans").mkdir()
    (folder / "imagesTr" / "case0_0000.nii.gz").rename(folder / "scans" / "first.nii.gz")
    (folder / "imagesTr" / "alias.nii.gz").symlink_to(folder / "imagesTr" / "case1_0000.nii.gz")
    _with_listing(folder, {"a": {"images": ["scans/first.nii.gz"], "label": "labelsTr/case0.nii.gz"},
                           "b": {"images": ["imagesTr/alias.nii.gz"], "label": None}})
    info = load_dataset_json(folder)
    cases, problems = list_cases(info)
    assert problems == []
    assert [(c.identifier, c.images[0].name, c.labelled) for c in cases] == [
        ("a", "first.nii.gz", True), ("b", "alias.nii.gz", False)]
    fp = compute_fingerprint(folder, 1, False)
    assert fp["num_cases"] == 2 and fp["num_labelled"] == 1


def test_listing_missing_file_is_a_problem(roots: dict[str, Path]) -> None:
    folder = make_raw_dataset(roots["raw"])
    _with_listing(folder, {"a": {"images": ["imagesTr/nope_0000.nii.gz"], "label": None}})
    cases, problems = list_cases(load_dataset_json(folder))
    assert cases == [] and len(problems) == 1
    assert problems[0].file.endswith("nope_0000.nii.gz") and "does not exist" in problems[0].what


@pytest.mark.parametrize("listing,match", [
    ({"a": {"images": ["/etc/passwd"], "label": None}}, "is an absolute path"),
    ({"a": {"images": ["imagesTr/case0_0000.nii.gz"], "label": "/tmp/label.nii.gz"}}, "is an absolute path"),
    ({"a": {"images": ["C:/data/a_0000.nii.gz"], "label": None}}, "is an absolute path"),
    ({"a": {"images": ["~/a_0000.nii.gz"], "label": None}}, "is an absolute path"),
    ({"a": {"images": ["../Dataset001_Other/imagesTr/x_0000.nii.gz"], "label": None}}, "contains '..'"),
    ({"a": {"images": ["imagesTr/../../x_0000.nii.gz"], "label": None}}, "contains '..'"),
    ({"a": {"images": ["imagesTr\\..\\..\\x_0000.nii.gz"], "label": None}}, "contains '..'"),
    ({"../evil": {"images": ["imagesTr/case0_0000.nii.gz"], "label": None}}, "not a plain name"),
    ({".hidden": {"images": ["imagesTr/case0_0000.nii.gz"], "label": None}}, "not a plain name"),
    ({"a": {"images": "imagesTr/case0_0000.nii.gz"}}, "needs an \"images\" list"),
    ({"a": {"images": [3], "label": None}}, "must be a file path"),
    ({"a": {"images": ["imagesTr/case0_0000.nii.gz", "imagesTr/case1_0000.nii.gz"]}}, "declares 1 channel"),
    ([], "must be a non-empty object"),
])
def test_listing_outside_refused(roots: dict[str, Path], listing: object, match: str) -> None:
    folder = make_raw_dataset(roots["raw"])
    _with_listing(folder, listing)
    with pytest.raises(DiffprobeError, match=match) as exc:
        load_dataset_json(folder)
    assert exc.value.file == str(folder / "dataset.json") and exc.value.fix


@pytest.mark.parametrize("link", ["file", "folder"])
def test_listing_symlink_leaving_the_folder_refused(roots: dict[str, Path], tmp_path: Path, link: str) -> None:
    folder = make_raw_dataset(roots["raw"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x_0000.nii.gz").write_bytes((folder / "imagesTr" / "case0_0000.nii.gz").read_bytes())
    if link == "file":
        (folder / "imagesTr" / "x_0000.nii.gz").symlink_to(outside / "x_0000.nii.gz")
        entry = "imagesTr/x_0000.nii.gz"
    else:
        os.symlink(outside, folder / "more", target_is_directory=True)
        entry = "more/x_0000.nii.gz"
    _with_listing(folder, {"x": {"images": [entry], "label": None}})
    with pytest.raises(DiffprobeError, match="symbolic link that resolves outside") as exc:
        load_dataset_json(folder)
    assert exc.value.file == str(folder / "dataset.json")

from pathlib import Path

import pytest

from diffprobe import paths
from diffprobe.errors import DiffprobeError


def test_env_precedence(monkeypatch, tmp_path):
    for v in ("DIFFPROBE_RAW", "nnUNet_raw"):
        monkeypatch.delenv(v, raising=False)
    assert paths.raw_root() == paths.DEFAULT_BASE / "raw"
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nn"))
    assert paths.raw_root() == tmp_path / "nn"
    monkeypatch.setenv("DIFFPROBE_RAW", str(tmp_path / "dp"))
    assert paths.raw_root() == tmp_path / "dp"


@pytest.mark.parametrize("spec,expected", [("1", (1, None)), ("001", (1, None)), (7, (7, None)),
                                           ("Dataset012_Liver", (12, "Liver"))])
def test_parse_dataset_id(spec, expected):
    assert paths.parse_dataset_id(spec) == expected


@pytest.mark.parametrize("spec", ["Dataset001_../../x", "Dataset001_a/b", "Dataset001_a\\b", "/abs", "../x"])
def test_dataset_name_with_path_parts_is_no_dataset_id(spec):
    """`-d Dataset001_../../x` (or such a name in a model.json) must not become a path outside the roots."""
    assert not paths.is_dataset_folder_name(spec)
    with pytest.raises(DiffprobeError, match="is not a dataset id"):
        paths.parse_dataset_id(spec)


def test_resolve_dataset(roots):
    (roots["raw"] / "Dataset003_Abc").mkdir()
    assert paths.dataset_name("3") == "Dataset003_Abc"
    assert paths.dataset_name("003") == "Dataset003_Abc"
    assert paths.preprocessed_dir(3) == Path(roots["preprocessed"]) / "Dataset003_Abc" / "diffprobe"
    with pytest.raises(DiffprobeError, match="no dataset with id 004"):
        paths.dataset_name(4)
    (roots["raw"] / "Dataset003_Other").mkdir()
    with pytest.raises(DiffprobeError, match="several datasets"):
        paths.dataset_name(3)
    with pytest.raises(DiffprobeError):
        paths.parse_dataset_id("abc")

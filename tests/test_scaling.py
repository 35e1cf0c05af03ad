"""Pretraining's index of N preprocessed volumes stays lazy: no array opened, each properties JSON
parsed at most once (never again while it is unchanged), and a rewritten case is seen.

Why: start-up that opens every array or parses every properties JSON grows with the dataset
(docs/performance.md "Scaling": 1000 volumes took ~12 s to index before the case index).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffprobe.planning.planner import plan
from diffprobe.preprocessing import access
from diffprobe.preprocessing.preprocess import preprocessing_hash
from diffprobe.preprocessing.storage import save_case
from diffprobe.utils import write_json

SHAPE = (12, 24, 24)
N = 12


def _write_dataset(pre_root: Path, n: int = N) -> tuple[Path, dict]:
    """``n`` small cases in the storage format (every third labelled, with class locations)."""
    folder = pre_root / "Dataset077_Lazy" / "diffprobe"
    (folder / "data").mkdir(parents=True)
    fingerprint = {"spacings": [[3.0, 1.5, 1.5]] * 2, "shapes_after_crop": [list(SHAPE)] * 2,
                   "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "dataset": "Dataset077_Lazy",
                   "median_spacing": [3.0, 1.5, 1.5], "num_cases": n, "num_labelled": n // 3}
    plans = plan(fingerprint, size_class="tiny", patch_size=[8, 16, 16])
    write_json(folder / "plans.json", plans)
    rng = np.random.default_rng(0)
    for i in range(n):
        labelled = i % 3 == 0
        props = {"identifier": f"v{i:03d}", "preprocessing_hash": preprocessing_hash(plans), "labelled": labelled,
                 "shape_after_resampling": list(SHAPE), "target_spacing": [3.0, 1.5, 1.5],
                 "class_locations": {"1": rng.integers(0, 12, (50, 3)).tolist()} if labelled else None}
        seg = np.ones(SHAPE, np.uint8) if labelled else None
        save_case(folder / "data", props["identifier"], rng.normal(size=(1, *SHAPE)).astype(np.float32), seg, props,
                  None)
    return folder, plans


class _Counts:
    """Counts parses of the cases' properties JSONs (``json.load`` of a file in ``data/``, whoever calls
    it) and blosc2 array opens; the real functions still run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import blosc2

        self.json = self.arrays = 0
        real_load, real_open = json.load, blosc2.open

        def load(f, *a, **k):
            if Path(getattr(f, "name", "")).parent.name == "data":
                self.json += 1
            return real_load(f, *a, **k)

        def open_(*a, **k):
            self.arrays += 1
            return real_open(*a, **k)

        monkeypatch.setattr(json, "load", load)
        monkeypatch.setattr(blosc2, "open", open_)


def _index(dataset: str):
    from diffprobe.pretraining import data as pdata

    data_dir, _, ids = access.preprocessed_cases(dataset)
    return ids, pdata.volume_refs(data_dir, ids)


def test_index_opens_no_array_and_parses_each_json_once(roots, monkeypatch):
    from diffprobe.pretraining import data as pdata

    folder, _ = _write_dataset(roots["preprocessed"])
    counts = _Counts(monkeypatch)
    ids, refs = _index("77")
    assert len(ids) == N and [r.shape for r in refs] == [SHAPE] * N
    assert refs[0].spacing == (3.0, 1.5, 1.5)
    assert counts.arrays == 0, "indexing the volumes must not open their arrays"
    assert counts.json == N, "each properties JSON parsed once (it was twice: is_finished, then volume_refs)"
    # the loader's source is built without touching any array either; a batch opens only what it reads
    source = pdata.PatchBatches(refs, [8, 16, 16], 2, "physical", augment=False)
    assert counts.arrays == 0
    source.batch(0)
    assert counts.arrays == 2
    # the next start-up: the index answers, no properties JSON is parsed
    counts.json = 0
    ids2, refs2 = _index("77")
    assert (ids2, refs2) == (ids, refs) and counts.json == 0
    assert json.loads((folder / access.INDEX_FILENAME).read_text())["format"] == access.INDEX_FORMAT


def test_index_follows_rewritten_removed_and_unfinished_cases(roots, monkeypatch):
    folder, plans = _write_dataset(roots["preprocessed"])
    _index("77")
    data = folder / "data"
    # a re-preprocessed case (other shape): parsed again, its new shape used
    props = json.loads((data / "v001.json").read_text())
    props["shape_after_resampling"] = [10, 20, 20]
    write_json(data / "v001.json", props)
    # an unfinished case (JSON without its array) and one whose plans changed are left out
    (data / "v002.b2nd").unlink()
    stale = json.loads((data / "v004.json").read_text())
    stale["preprocessing_hash"] = "something-else"
    write_json(data / "v004.json", stale)
    (data / "v005.json").unlink()
    counts = _Counts(monkeypatch)
    ids, refs = _index("77")
    assert counts.json == 2  # only the two rewritten JSONs
    assert "v002" not in ids and "v004" not in ids and "v005" not in ids and len(ids) == N - 3
    assert {r.identifier: r.shape for r in refs}["v001"] == (10, 20, 20)


def test_corrupt_or_unwritable_index_only_costs_parsing(roots, monkeypatch):
    folder, _ = _write_dataset(roots["preprocessed"])
    (folder / access.INDEX_FILENAME).write_text("{not json")
    ids, _ = _index("77")
    assert len(ids) == N
    assert json.loads((folder / access.INDEX_FILENAME).read_text())["format"] == access.INDEX_FORMAT

    def refuse(*_a, **_k):
        raise PermissionError("read-only dataset")

    (folder / access.INDEX_FILENAME).unlink()
    monkeypatch.setattr(access, "write_json", refuse)
    ids2, _ = _index("77")
    assert ids2 == ids and not (folder / access.INDEX_FILENAME).exists()

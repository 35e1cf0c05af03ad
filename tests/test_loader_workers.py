"""Loader processes per device: the plans' number on a CPU, enough to feed a GPU (measured: one starved it)."""

import pytest

from diffprobe import devices
from diffprobe.errors import DiffprobeError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(devices.WORKERS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_cpu_keeps_the_planned_number(monkeypatch):
    monkeypatch.setattr(devices, "usable_cores", lambda: 64)
    assert devices.loader_workers(1, "cpu") == 1
    assert devices.loader_workers(0, "cpu") == 0


def test_gpu_uses_the_idle_cores_up_to_nnunets_default(monkeypatch):
    monkeypatch.setattr(devices, "usable_cores", lambda: 16)
    assert devices.loader_workers(1, "cuda") == devices.GPU_LOADER_WORKERS == 12
    assert devices.loader_workers(1, "cuda:0") == 12
    monkeypatch.setattr(devices, "usable_cores", lambda: 6)
    assert devices.loader_workers(1, "cuda") == 5  # one core left for the training process
    assert devices.loader_workers(8, "cuda") == 8  # never fewer than planned
    monkeypatch.setattr(devices, "usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # DDP: 4 processes share the 16 cores
    assert devices.loader_workers(1, "cuda") == 3


def test_environment_sets_the_number_and_refuses_garbage(monkeypatch):
    monkeypatch.setenv(devices.WORKERS_ENV, "3")
    assert devices.loader_workers(1, "cuda") == 3 and devices.loader_workers(1, "cpu") == 3
    monkeypatch.setenv(devices.WORKERS_ENV, "many")
    with pytest.raises(DiffprobeError, match=devices.WORKERS_ENV):
        devices.loader_workers(1, "cpu")


def test_pretraining_records_the_workers_it_used(use_phantom_roots, monkeypatch):
    """pretrain applies the rule (CPU here: the plans' number) unless --num_workers is given."""
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.utils import read_json

    monkeypatch.setenv(devices.WORKERS_ENV, "0")
    result = pretrain(["1"], name="workers", stage="bpr", device="cpu", show_progress=False,
                      overrides={"bpr_steps": 1})
    assert read_json(result.model_dir / "model.json")["plans"]["training"]["num_workers"] == 0
    result = pretrain(["1"], name="workers2", stage="bpr", device="cpu", show_progress=False,
                      overrides={"bpr_steps": 1, "num_workers": 1})
    assert read_json(result.model_dir / "model.json")["plans"]["training"]["num_workers"] == 1

"""The host allocator settings: freed tensor memory is reused instead of faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffprobe import host_allocator

pytestmark = pytest.mark.skipif(host_allocator._glibc() is None, reason="mallopt settings are glibc's")

# A stage's start (resolve_device), then the forwards of a small conv block on a tile batch as
# predict runs them (feature maps of 38 MB, above glibc's 32 MiB mmap ceiling): the page faults of
# the forwards after the first are counted.
LOOP = """
import json, resource, torch
from diffprobe.devices import resolve_device
from diffprobe.host_allocator import release_free_memory
resolve_device("cpu")
torch.manual_seed(0)
torch.set_num_threads(1)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
conv = torch.nn.Conv3d(16, 16, 3, padding=1)
x = torch.randn(6, 16, 24, 64, 64)
with torch.no_grad():
    sums = [float(conv(torch.nn.functional.silu(conv(x))).sum())]  # warm-up: first pages fault either way
    before = faults()
    for _ in range(3):
        sums.append(float(conv(torch.nn.functional.silu(conv(x))).sum()))
loop = faults() - before
release_free_memory()
print(json.dumps({"faults": loop, "sums": sums}))
"""


def _transparent_huge_pages() -> str:
    """The kernel's THP mode (the bracketed word of .../transparent_hugepage/enabled), or "" when unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def _loop_faults(tuning: str) -> dict:
    env = {**os.environ, host_allocator.ENV: tuning}
    out = subprocess.run([sys.executable, "-c", LOOP], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fewest_tuned_faults(bound: int, attempts: int = 3) -> dict:
    """The tuned loop's run with the fewest faults, stopping at the first under ``bound``.

    Why more than one run: a fault count also counts what the machine does to the process. In one
    full-suite run of ~10 on the 2-core VM the tuned loop faulted one feature map's worth of pages
    (9217) that the same loop never faulted alone. Broken tuning faults every page in every run,
    so it still fails every attempt."""
    runs = []
    for _ in range(attempts):
        runs.append(_loop_faults("1"))
        if runs[-1]["faults"] < bound:
            break
    return min(runs, key=lambda run: run["faults"])


def test_stage_start_keeps_freed_tensors_for_reuse():
    pages = 3 * 2 * (6 * 16 * 24 * 64 * 64 * 4) // 4096  # two new feature maps per forward, every page
    tuned, plain = _fewest_tuned_faults(bound=pages // 20), _loop_faults("0")
    assert tuned["sums"] == plain["sums"]  # the arithmetic is untouched
    if _transparent_huge_pages() != "always":  # with THP always, fresh maps fault once per 2 MB, not per 4 KB
        assert plain["faults"] > pages // 2  # glibc's defaults: mapped fresh each time (the problem)
    assert tuned["faults"] < pages // 20  # tuned: the same heap memory, reused


def test_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(host_allocator.ENV, "off")
    assert not host_allocator.tuning_wanted()
    monkeypatch.setenv(host_allocator.ENV, "1")
    assert host_allocator.tuning_wanted()

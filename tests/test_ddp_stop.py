"""Distributed pretraining that cannot hang: 2 gloo ranks on CPU running the real ``diffprobe pretrain``
(tiny size class on the session's phantoms, the real denoiser and trainer).

Each test starts its ranks as separate processes (not ``mp.spawn``, whose join would terminate the
survivors of a failed rank and so hide a hang) and joins them under a hard deadline: a rank that
does not exit by itself fails the test instead of blocking CI. One pair of ranks runs several
scenarios one after the other (process start-up is most of the cost); what a rank prints in a
scenario goes to ``<scenario>_rank<r>.log`` (its file descriptors 1 and 2), which the tests read.

- the BPR maps are shared out: both ranks compute some, together all of them, equal to a
  single-process computation and stamped current;
- a non-finite loss, a data error (raised in a DataLoader worker) or SIGTERM on rank 1 stops both
  ranks with the same message; SIGKILL of rank 1 (no message possible) stops rank 0 with "lost
  contact";
- SIGTERM to the torchrun launcher stops the launcher and every rank.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

DEADLINE_S = 90.0  # per test: generous on a loaded 2-core machine; a hang waits forever otherwise
WORLD = 2


def _args(name: str, guidance: str = "none", steps: int = 6, num_workers: int = 0, *extra: str) -> list[str]:
    """``diffprobe pretrain`` on the phantoms (dataset 1, tiny plans), on the CPU, no checkpoint before the end."""
    return ["pretrain", "-d", "1", "--name", name, "--guidance", guidance, "--diffusion_steps", str(steps),
            "--num_workers", str(num_workers), "-device", "cpu", "--checkpoint_every", "1000", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _roots(phantom_roots, base: Path) -> dict[str, Path]:
    """The session's preprocessed phantoms (tiny plans) with an empty results folder of its own."""
    roots = {k: base / k for k in ("raw", "preprocessed", "results")}
    roots["raw"].mkdir(parents=True)
    roots["results"].mkdir()
    shutil.copytree(phantom_roots["preprocessed"], roots["preprocessed"])
    return roots


# ---- in the rank processes -------------------------------------------------------------------
_NOW: dict[str, str] = {"scenario": ""}  # the scenario the rank runs now (the patches below ask it)


def _inject(rank: int, out: Path) -> None:
    """Patch the pipeline so that rank 1 fails the way the current scenario says, at diffusion step 1
    (after one good step), and every rank records which BPR maps it computed."""
    import diffprobe.pretraining.pretrain as pretrain_mod
    from diffprobe.errors import DiffprobeError
    from diffprobe.pretraining import bpr_maps, data

    original_map, original_batch, original_loss = bpr_maps.write_bpr_map, data.PatchBatches.batch, \
        pretrain_mod.DiffusionLoss.__call__

    def logged_map(model, ref, *args, **kwargs):
        with open(out / f"maps_rank{rank}.txt", "a") as f:
            f.write(ref.identifier + "\n")
        return original_map(model, ref, *args, **kwargs)

    def broken_batch(self, step):
        if rank == 1 and step == 1 and _NOW["scenario"] == "data":
            raise DiffprobeError("case phantom_001: blosc2 chunk 3 cannot be decompressed", "phantom_001.b2nd",
                                 "preprocess the case again")
        return original_batch(self, step)

    def bad_loss(self, model, batch, step):
        loss, metrics = original_loss(self, model, batch, step)
        if rank == 1 and step == 1:
            if _NOW["scenario"] == "nan":
                return loss * float("nan"), metrics
            if _NOW["scenario"] in ("sigterm", "sigkill"):
                os.kill(os.getpid(), signal.SIGTERM if _NOW["scenario"] == "sigterm" else signal.SIGKILL)
        return loss, metrics

    bpr_maps.write_bpr_map, data.PatchBatches.batch, pretrain_mod.DiffusionLoss.__call__ = logged_map, \
        broken_batch, bad_loss


def _rank_main(rank: int, port: int, roots: dict[str, str], out: str, runs: list[tuple[str, list[str]]]) -> None:
    """One rank: torchrun's environment, then the real CLI once per (scenario, argv), its output in
    ``<scenario>_rank<r>.log`` and its exit code in ``<scenario>_rank<r>.code``; exits with the last
    code. The runs share one process group: an agreed stop leaves every rank at the same point."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    for kind, folder in roots.items():
        os.environ[f"DIFFPROBE_{kind.upper()}"] = folder
    import multiprocessing

    import torch

    # as in a rank torchrun starts (a fresh interpreter): DataLoader workers are forked, and inherit _inject's
    # patches (a process started by spawn, as this one, would spawn them too)
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    _inject(rank, Path(out))
    from diffprobe.cli import main

    code = 0
    for scenario, argv in runs:
        _NOW["scenario"] = scenario
        log = os.open(os.path.join(out, f"{scenario}_rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = main(argv)
        Path(out, f"{scenario}_rank{rank}.code").write_text(str(code))
    from diffprobe.training import distributed

    distributed.shutdown(success=code == 0)  # as the console script leaves (main(argv) does not)
    sys.exit(code)


def _run_ranks(roots: dict[str, Path], out: Path, runs: list[tuple[str, list[str]]]) -> list[int | None]:
    """Start both ranks, wait for both under the deadline; their exit codes. Kills and fails on timeout."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, {k: str(v) for k, v in roots.items()}, str(out), runs))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    logs = "\n".join(f"--- {f.name}\n{f.read_text()}" for f in sorted(out.glob("*.log")))
    assert not hung, f"rank(s) {hung} still running after {DEADLINE_S} s:\n{logs}"
    return [p.exitcode for p in procs]


def _outcome(out: Path, scenario: str) -> tuple[list[int | None], list[str]]:
    """Every rank's exit code (None: the rank never finished this run) and output of one scenario."""
    codes = [int(f.read_text()) if (f := out / f"{scenario}_rank{r}.code").is_file() else None for r in range(WORLD)]
    logs = [f.read_text() if (f := out / f"{scenario}_rank{r}.log").is_file() else "" for r in range(WORLD)]
    return codes, logs


def _common_line(logs: list[str], needle: str) -> str:
    """The one line containing ``needle``, the same in every rank's log."""
    lines = [[line for line in log.splitlines() if needle in line] for log in logs]
    assert all(lines), f"{needle!r} missing from a rank's output:\n" + "\n----\n".join(logs)
    assert all(found == lines[0] for found in lines), lines
    return lines[0][0]


SCENARIOS = [  # one pair of rank processes runs them in this order (sigterm last: it ends the process)
    ("maps", _args("shared", "bpr", 2, 0, "--bpr_steps", "2")),
    ("nan", _args("nan")),
    ("data", _args("data", num_workers=1)),  # the error comes back from a DataLoader worker
    ("sigterm", _args("sigterm")),
]


@pytest.fixture(scope="module")
def scenarios(phantom_roots, tmp_path_factory) -> tuple[dict[str, Path], Path, list[int | None]]:
    """The runs of :data:`SCENARIOS` by one pair of ranks: (roots, output folder, exit codes)."""
    base = tmp_path_factory.mktemp("ddp_scenarios")
    roots = _roots(phantom_roots, base)
    return roots, base, _run_ranks(roots, base, SCENARIOS)


# ---- the tests -------------------------------------------------------------------------------
def test_bpr_maps_shared_across_ranks_equal_single_process(scenarios):
    import torch

    from diffprobe.paths import roots_at
    from diffprobe.preprocessing.storage import load_array
    from diffprobe.pretraining.bpr_maps import with_bpr_maps, write_bpr_maps
    from diffprobe.pretraining.pretrain import collect_volumes
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    roots, out, _ = scenarios
    codes, logs = _outcome(out, "maps")
    assert codes == [0, 0], "\n----\n".join(logs)
    computed = [(out / f"maps_rank{r}.txt").read_text().split() for r in range(WORLD)]
    assert all(computed), computed  # both ranks computed some
    with roots_at(out):
        volumes, _, _ = collect_volumes(["1"])
        model = PretrainedModel("shared")
        assert sorted(computed[0] + computed[1]) == sorted(v.identifier for v in volumes)  # each exactly once
        mapped = with_bpr_maps(volumes, model.folder)  # every stamp current
        bpr, crop = model.load_bpr("cpu")
        single = write_bpr_maps(bpr, volumes, crop, out / "single", torch.device("cpu"), bpr_checksum="x")
    for shared, alone in zip(mapped, single, strict=True):
        assert np.array_equal(load_array(shared.guidance_path), load_array(alone.guidance_path)), shared.identifier
    assert (model.folder / "bpr_quality.json").is_file()
    assert (model.folder / "diffusion" / "checkpoint_final.pt").is_file()


@pytest.mark.parametrize(("scenario", "needle", "code"), [
    ("nan", "rank 1 of 2: diffusion: loss became nan at step 1", 1),
    ("data", "rank 1 of 2: phantom_001.b2nd: case phantom_001: blosc2 chunk 3 cannot be decompressed", 1),
    ("sigterm", "diffusion step 2: rank 1 of 2 received SIGTERM", 130),  # at step 1, held to its end
])
def test_a_failing_rank_stops_every_rank_with_one_message(scenarios, scenario, needle, code):
    _, out, exit_codes = scenarios
    codes, logs = _outcome(out, scenario)
    assert codes == [code, code], "\n----\n".join(logs)
    assert "all 2 ranks stop" in _common_line(logs, needle)
    assert all("Traceback" not in log for log in logs)  # user errors: one message, no traceback
    if scenario == "sigterm":
        assert exit_codes == [130, 130]  # the processes themselves


def test_a_killed_rank_stops_the_others_with_lost_contact(phantom_roots, tmp_path):
    roots = _roots(phantom_roots, tmp_path)
    exit_codes = _run_ranks(roots, tmp_path, [("sigkill", _args("killed"))])
    codes, logs = _outcome(tmp_path, "sigkill")
    assert exit_codes == [1, -signal.SIGKILL], "\n----\n".join(logs)
    assert "lost contact with the other ranks" in logs[0] and "Traceback" not in logs[0]


def test_sigterm_to_the_torchrun_launcher_stops_every_rank(phantom_roots, tmp_path):
    roots = _roots(phantom_roots, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "DIFFPROBE_"))}
    env.update({f"DIFFPROBE_{k.upper()}": str(v) for k, v in roots.items()} | {"OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "--monitor_interval=0.1", "-m", "diffprobe", *_args("launcher", steps=100000)]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        launcher = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    started = roots["results"] / "pretrained" / "launcher" / "diffusion"
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not started.is_dir():
            assert launcher.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "training never started:\n" + log.read_text()
            time.sleep(0.1)
        ranks = _children(launcher.pid)
        assert len(ranks) == WORLD, ranks
        time.sleep(0.3)  # a step or two in
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=max(1.0, deadline - time.monotonic()))
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), "a rank outlived the launcher:\n" + log.read_text()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    text = log.read_text()
    # every rank got SIGTERM from torchrun at about the same moment: which one is named first varies
    assert "received SIGTERM" in text, text


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.is_file():
            found += [int(c) for c in children.read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"

"""A 2-process gloo DDP run keeps weights identical across ranks; only rank 0 writes files. The DDP
helpers: the collective timeout, balanced shares, loader errors (the stops: test_ddp_stop.py)."""

import contextlib
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffprobe.errors import DiffprobeError
from diffprobe.training import distributed as dist_utils
from diffprobe.training import stop_signals
from diffprobe.training.trainer import Trainer, TrainerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_rank(rank: int, world: int, port: int) -> torch.device:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    return dist_utils.init_from_env("cpu")


def _fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(rank: int, start: int, kill_at: int | None = None):
    """Each rank sees different data; raising at ``kill_at`` simulates a killed run."""
    step = start
    while True:
        if step == kill_at:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(1000 * (rank + 1) + step)
        x = torch.randn(8, 3, generator=g)
        yield x, x.sum(1, keepdim=True)
        step += 1


def _loss_fn(m, batch, step):
    x, y = batch
    return ((m(x) - y) ** 2).mean(), {}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    device = _init_rank(rank, world, port)
    cfg = TrainerConfig(total_steps=12, lr=1e-2, warmup_steps=2, checkpoint_every=5, log_every=4)
    tr = Trainer(_fresh_model(), _loss_fn, cfg, os.path.join(out, "run"), device)
    tr.fit(lambda s: _batches(rank, s), show_progress=False)
    torch.save(tr.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    del tr
    dist_utils.shutdown()  # as the CLI leaves: barrier, then the group freed
    assert not dist_utils.is_distributed()


def test_ddp_gloo_weights_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = _fresh_model()
    assert not torch.equal(init[0].weight, a["0.weight"])  # it trained
    assert (tmp_path / "run" / "checkpoint_final.pt").is_file()
    assert len((tmp_path / "run" / "training_log.jsonl").read_text().splitlines()) == 3  # rank 0 only


def _resume_worker(rank: int, world: int, port: int, out: str) -> None:
    device = _init_rank(rank, world, port)
    cfg = TrainerConfig(total_steps=12, lr=1e-2, warmup_steps=2, checkpoint_every=5, log_every=4, ema_decay=0.9)
    full = Trainer(_fresh_model(), _loss_fn, cfg, os.path.join(out, "full"), device)
    full.fit(lambda s: _batches(rank, s), show_progress=False)
    part = Trainer(_fresh_model(), _loss_fn, cfg, os.path.join(out, "part"), device)
    with contextlib.suppress(KeyboardInterrupt):  # killed at step 7, after checkpoint_latest at 5
        part.fit(lambda s: _batches(rank, s, kill_at=7), show_progress=False)
    resumed = Trainer(_fresh_model(), _loss_fn, cfg, os.path.join(out, "part"), device)
    assert resumed.resume() and resumed.step == 5
    resumed.fit(lambda s: _batches(rank, s), show_progress=False)
    same = all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                   resumed.model.state_dict().values()))
    torch.save({"same": torch.tensor(same)}, os.path.join(out, f"resume_rank{rank}.pt"))
    del full, part, resumed
    dist_utils.shutdown()


def test_ddp_resume_equals_uninterrupted(tmp_path):
    mp.spawn(_resume_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        assert torch.load(tmp_path / f"resume_rank{r}.pt", weights_only=True)["same"].item()


def test_collective_timeout_is_explicit_and_configurable(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist_utils, "install_stop_signals", lambda **kw: None)  # not in pytest's own process
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv(dist_utils.TIMEOUT_ENV, raising=False)
    dist_utils.init_from_env("cpu")
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=30)}
    monkeypatch.setenv(dist_utils.TIMEOUT_ENV, "2.5")
    dist_utils.init_from_env("cpu")
    assert seen["timeout"] == datetime.timedelta(minutes=2.5)
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(dist_utils.TIMEOUT_ENV, bad)
        with pytest.raises(DiffprobeError, match=dist_utils.TIMEOUT_ENV):
            dist_utils.init_from_env("cpu")


def test_balanced_shares_cover_everything_once_and_balance_the_cost():
    costs = [9.0, 1.0, 1.0, 1.0, 5.0, 4.0, 3.0, 2.0]
    shares = dist_utils.balanced_shares(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs) and max(loads) <= 10.0  # total 26: 9/9/8 is possible
    assert dist_utils.balanced_shares(costs, 3) == shares  # every rank computes the same split
    assert dist_utils.balanced_shares([], 2) == [[], []]
    assert dist_utils.balanced_shares([1.0, 2.0], 1) == [[0, 1]]


def test_a_loader_processes_user_error_becomes_one_clean_message():
    """A DataLoader worker's DiffprobeError comes back as its traceback text; the trainer shows the error."""
    wrapped = RuntimeError("Caught DiffprobeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 3, in batch\n    raise DiffprobeError(...)\n"
                           "diffprobe.errors.DiffprobeError: case_7.b2nd: chunk 3 is corrupt\n"
                           "    fix: preprocess again\n")
    error = dist_utils.worker_user_error(wrapped)
    assert error is not None and error.format() == "case_7.b2nd: chunk 3 is corrupt\n    fix: preprocess again"
    assert dist_utils.worker_user_error(RuntimeError("plain")) is None
    bug = RuntimeError(str(wrapped).replace("diffprobe.errors.DiffprobeError", "ZeroDivisionError"))
    assert dist_utils.worker_user_error(bug) is None


def test_shutdown_meets_in_a_barrier_after_success_and_always_frees_the_group(monkeypatch):
    calls = []
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    dist_utils.shutdown()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    dist_utils.shutdown(success=False)  # after an error a peer may be gone: no waiting for it
    assert calls == ["destroy"]
    calls.clear()
    monkeypatch.setitem(stop_signals.state, "agreed", True)  # a stop every rank raised: all alive
    dist_utils.shutdown(success=False)
    assert calls == ["barrier", "destroy"]
    monkeypatch.setitem(stop_signals.state, "agreed", False)
    calls.clear()

    def lost():
        calls.append("barrier")
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "barrier", lost)
    dist_utils.shutdown()
    assert calls == ["barrier", "destroy"]
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: False)
    calls.clear()
    dist_utils.shutdown()
    assert calls == []  # a single process has no group


def _fresh_stop_state(monkeypatch) -> dict:
    state = {"installed": False, "received": None, "previous": {}, "defer": 0, "pending": False, "agreed": False}
    monkeypatch.setattr(stop_signals, "state", state)
    monkeypatch.setattr(stop_signals, "_distributed", lambda: True)
    return state


def test_a_stop_signal_during_a_step_is_held_to_the_steps_end(monkeypatch):
    """A rank leaving mid-step would meet its peers' gradient all-reduce with its stop agreement."""
    import signal

    _fresh_stop_state(monkeypatch)
    done = []
    with pytest.raises(KeyboardInterrupt), stop_signals.signals_deferred():
        stop_signals._on_stop_signal(signal.SIGTERM, None)  # as the handler runs when the signal arrives
        done.append("backward")  # the rest of the step still runs
    assert done == ["backward"]


def test_a_stop_signal_while_reading_the_batch_is_raised_at_once(monkeypatch):
    import signal

    state = _fresh_stop_state(monkeypatch)
    done = []
    with pytest.raises(KeyboardInterrupt), stop_signals.signals_deferred():
        try:
            with stop_signals.signals_allowed():
                stop_signals._on_stop_signal(signal.SIGINT, None)
                done.append("rest of the read")
        finally:
            assert state["defer"] == 1  # the step's hold is back for its agreement
    assert done == [] and state["defer"] == 0


def test_signal_holds_are_no_ops_in_a_single_process():
    with stop_signals.signals_deferred(), stop_signals.signals_allowed():
        pass

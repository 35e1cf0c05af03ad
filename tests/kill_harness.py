"""Kill a diffprobe command anywhere, rerun it, check that nothing was lost.

A :class:`Stage` is one long command (``plan_and_preprocess``, ``pretrain``, ``train``,
``predict``) with the arguments of its first run, the arguments that continue it (``--c``,
``--continue_prediction``, or the same ones), the folders it writes and a comparison with an
uninterrupted run. A :class:`KillLab` runs every command as a subprocess of ``python -m
diffprobe`` in one fixed folder (``<base>/work``, so absolute paths inside outputs are the
same in every run) and:

1. runs each stage uninterrupted once (the reference), timing it and snapshotting the folder;
2. for an experiment, restores the snapshot taken before the stage and runs *attempts*: each
   one but the last is stopped at a :class:`KillPoint` (a moment after its start, or when a
   file gets a new version), by a signal to the command's whole process group (SIGKILL: the
   OOM killer or a lost node; SIGINT: Ctrl-C in a terminal, which reaches the group too);
   after each stop it checks every file a later stage reads (:func:`check_tree`) and what a
   resumed trainer must start from; the last attempt must run to exit 0 and its result must
   equal the reference (``Stage.compare``).

A point that the command outlives is a real stop; one it does not (the run finished first)
is recorded as such, and time points are retried earlier, so tests can require real stops.
Everything runs with one thread per process (``OMP_NUM_THREADS=1``), which makes CPU
training bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kill_checks import TreeCheck, check_tree

INTERRUPT_MESSAGE = "interrupted: finished outputs are kept; rerun the same command to continue"
RESUMED_RE = re.compile(r"^(?P<name>.+): resumed from step (?P<step>\d+) \((?P<file>[\w.]+)\)$", re.M)
POLL_S = 0.002


def subprocess_env(work: Path) -> dict[str, str]:
    """The environment of every command: data roots under ``work``, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "DIFFPROBE_"))}
    for kind in ("raw", "preprocessed", "results"):
        env[f"DIFFPROBE_{kind.upper()}"] = str(work / kind)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONHASHSEED": "0", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    return env


# ---- stopping a command ---------------------------------------------------------------------
@dataclass(frozen=True)
class KillPoint:
    """When to stop an attempt, and how.

    ``after``: glob patterns (relative to the work folder); the clock starts when the
    ``nth`` new version of a matching file appears (a file created or replaced by this
    attempt; atomic writes replace the inode), otherwise at the start. ``delay_s``: seconds
    after that. ``signal``: SIGKILL or SIGINT.
    """

    delay_s: float = 0.0
    after: tuple[str, ...] = ()
    nth: int = 1
    signal: int = signal.SIGKILL

    def label(self) -> str:
        sig = signal.Signals(self.signal).name
        if not self.after:
            return f"{sig} at {self.delay_s:.2f}s"
        return f"{sig} {self.delay_s:.2f}s after new version #{self.nth} of {'|'.join(self.after)}"


@dataclass
class Attempt:
    argv: list[str]
    point: KillPoint | None
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    signalled_at_s: float | None = None  # when the signal was sent (None: never)
    first_output_s: float | None = None  # when the first watched output existed

    @property
    def killed(self) -> bool:
        """The signal reached a live command (it did not finish first)."""
        if self.point is None or self.signalled_at_s is None:
            return False
        if self.point.signal == signal.SIGKILL:
            return self.returncode == -signal.SIGKILL
        return self.returncode != 0

    def describe(self) -> str:
        what = self.point.label() if self.point else "uninterrupted"
        at = f", sent at {self.signalled_at_s:.2f}s" if self.signalled_at_s is not None else ""
        return f"{what}{at}: rc {self.returncode} after {self.wall_s:.2f}s"


class _VersionWatch:
    """Counts new versions (path, inode) of files matching patterns, relative to a baseline."""

    def __init__(self, root: Path, patterns: Sequence[str]):
        self.root, self.patterns = root, list(patterns)
        self.seen = self._versions()
        self.new = 0

    def _versions(self) -> set[tuple[str, int]]:
        out = set()
        for pattern in self.patterns:
            for p in self.root.glob(pattern):
                with contextlib.suppress(FileNotFoundError):  # renamed or removed between glob and stat
                    out.add((str(p), p.stat().st_ino))
        return out

    def poll(self) -> int:
        now = self._versions()
        self.new += len(now - self.seen)
        self.seen |= now
        return self.new


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_attempt(argv: list[str], env: dict[str, str], cwd: Path, point: KillPoint | None = None,
                watch_outputs: Sequence[Path] = (), timeout_s: float = 600) -> Attempt:
    """Run ``python -m diffprobe ARGV`` in its own process group, stopping it at ``point``."""
    cmd = [sys.executable, "-m", "diffprobe", *argv]
    watch = _VersionWatch(cwd, point.after) if point is not None and point.after else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        # SIGINT back to its default in the child: a test run started in the background (`pytest &`
        # from a script) has SIGINT ignored, children inherit that, and Python then never installs
        # its Ctrl-C handler; the Ctrl-C attempts simulate a foreground terminal
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True,
                                preexec_fn=_default_sigint)
        clock = None if watch is not None else t0
        sent = first_output = None
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - t0 > timeout_s:
                    raise TimeoutError(f"{' '.join(argv)} ran over {timeout_s}s")
                if first_output is None and any(p.exists() for p in watch_outputs):
                    first_output = now - t0
                if point is not None and sent is None:
                    if clock is None and watch.poll() >= point.nth:
                        clock = now
                    if clock is not None and now - clock >= point.delay_s:
                        _signal_group(proc.pid, point.signal)
                        sent = time.monotonic() - t0
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None and (sent is None or point.signal == signal.SIGKILL):
                _signal_group(proc.pid, signal.SIGKILL)
            rc = proc.wait(timeout=120)
            _signal_group(proc.pid, signal.SIGKILL)  # workers that outlived the main process
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        return Attempt(argv, point, rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                       wall, sent, first_output)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ---- stages and experiments -----------------------------------------------------------------
@dataclass
class Stage:
    name: str
    argv: list[str]
    resume_argv: list[str]
    outputs: list[str]  # folders (relative to the work folder) the stage writes
    compare: Callable[[Path, Path], None]  # (reference work folder, this run's work folder)
    trainers: dict[str, str] = field(default_factory=dict)  # trainer folder (relative) -> trainer name


@dataclass
class Outcome:
    stage: str
    attempts: list[Attempt]
    checks: list[TreeCheck]
    wall_s: float

    @property
    def real_stops(self) -> int:
        return sum(a.killed for a in self.attempts)

    def describe(self) -> str:
        lines = [f"{self.stage}: {self.real_stops} real stop(s), {self.wall_s:.1f}s"]
        for a, c in zip(self.attempts, self.checks):
            lines.append(f"  {a.describe()}{' (finished before the signal)' if a.point and not a.killed else ''}"
                         f"; {c.summary()}")
        return "\n".join(lines)


def stratified_points(n: int, lo: float, hi: float, seed: int, **kwargs) -> list[KillPoint]:
    """``n`` time points, one drawn uniformly from each of ``n`` equal slices of ``[lo, hi]``."""
    rng = random.Random(seed)
    width = (hi - lo) / n
    return [KillPoint(delay_s=lo + width * (i + rng.random()), **kwargs) for i in range(n)]


class KillLab:
    """One fixed work folder, reference snapshots, and kill-and-rerun experiments on them."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.work = self.base / "work"
        self.env = subprocess_env(self.work)
        self.reference: dict[str, Attempt] = {}
        self.log: list[str] = []
        self.interrupted: list[Attempt] = []  # attempts stopped by Ctrl-C (SIGINT)

    # -- folders --
    def snapshot_path(self, name: str) -> Path:
        return self.base / "snapshots" / name

    def snapshot(self, name: str) -> Path:
        dest = self.snapshot_path(name)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.work, dest, symlinks=True)  # copy2 keeps mtimes (raw-file signatures)
        return dest

    def restore(self, name: str) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.snapshot_path(name), self.work, symlinks=True)

    # -- runs --
    def run(self, argv: list[str], point: KillPoint | None = None, watch_outputs: Sequence[str] = ()) -> Attempt:
        return run_attempt(argv, self.env, self.work, point, [self.work / w for w in watch_outputs])

    def run_reference(self, stage: Stage, before: str) -> Attempt:
        """Run ``stage`` uninterrupted on snapshot ``before``; its result becomes snapshot ``stage.name``."""
        self.restore(before)
        att = self.run(stage.argv, watch_outputs=stage.outputs)
        assert att.returncode == 0, f"reference {stage.name} failed:\n{att.stdout[-3000:]}\n{att.stderr[-3000:]}"
        self.reference[stage.name] = att
        self.snapshot(stage.name)
        return att

    def active_window(self, stage: str) -> tuple[float, float]:
        """(time the reference's first output appeared, the reference's duration)."""
        ref = self.reference[stage]
        return (ref.first_output_s or 0.0), ref.wall_s

    def _trainer_state(self, stage: Stage) -> dict[str, tuple[int, int] | None]:
        """Trainer name -> (step, total steps) of its checkpoint_latest (None: none yet)."""
        import torch

        out = {}
        for folder, name in stage.trainers.items():
            path = self.work / folder / "checkpoint_latest.pt"
            if path.is_file():
                ck = torch.load(path, map_location="cpu", weights_only=True)
                out[name] = (int(ck["step"]), int(ck["config"]["total_steps"]))
            else:
                out[name] = None
        return out

    def experiment(self, stage: Stage, before: str, points: Sequence[KillPoint], retries: int = 2,
                   resume_first: bool = False) -> Outcome:
        """Attempts stopped at ``points`` (in order), then one run to the end; checks after each.

        A time point that the attempt outlives is retried (from the files before it) at half
        the delay, ``retries`` times; other points are recorded as not stopping anything.
        ``resume_first``: the first attempt continues (``before`` holds a stopped run already).
        """
        t0 = time.monotonic()
        self.restore(before)
        attempts: list[Attempt] = []
        checks: list[TreeCheck] = []
        argv = stage.resume_argv if resume_first else stage.argv
        for point in [*points, None]:
            state = self._trainer_state(stage)
            keep = self.base / "attempt_before"
            if point is not None and not point.after and retries:
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(self.work, keep, symlinks=True)
            att = self.run(argv, point)
            tries = 0
            while point is not None and not point.after and not att.killed and tries < retries:
                tries += 1
                point = KillPoint(delay_s=point.delay_s / 2, signal=point.signal)
                shutil.rmtree(self.work)
                shutil.copytree(keep, self.work, symlinks=True)
                att = self.run(argv, point)
            self._check_attempt(stage, att, state, final=point is None)
            check = check_tree(self.work)
            assert not check.problems, f"{stage.name} after {att.describe()}: unreadable files:\n" + \
                "\n".join(check.problems)
            attempts.append(att)
            checks.append(check)
            argv = stage.resume_argv
            if point is not None and not att.killed:
                assert att.returncode == 0, f"{stage.name} {att.describe()}:\n{att.stderr[-3000:]}"
                break  # it finished: nothing left to continue
        stage.compare(self.snapshot_path(stage.name), self.work)
        trainer_dirs = [self.work / f for f in stage.trainers]
        stray = [t for t in checks[-1].temps if any(d in t.parents for d in trainer_dirs)]
        assert not stray, f"{stage.name}: temporary files left in trainer folders after the rerun: {stray}"
        outcome = Outcome(stage.name, attempts, checks, time.monotonic() - t0)
        self.log.append(outcome.describe())
        return outcome

    def _check_attempt(self, stage: Stage, att: Attempt, state: dict, final: bool) -> None:
        """Exit status, messages and the step each trainer resumed from."""
        where = f"{stage.name} {att.describe()}"
        if final or not att.killed:
            assert att.returncode == 0, f"{where}:\n{att.stdout[-2000:]}\n{att.stderr[-3000:]}"
        elif att.point.signal == signal.SIGINT:
            assert att.returncode == 130, f"{where}: Ctrl-C must exit with 130\n{att.stderr[-3000:]}"
            lines = [ln for ln in att.stderr.splitlines() if ln.strip()]
            # at most the one-line message (whether it is printed: test_kill_resume's Ctrl-C message test)
            assert lines in ([], [INTERRUPT_MESSAGE]), f"{where}: stderr holds more than the message:\n{att.stderr}"
            self.interrupted.append(att)
        resumed = {m["name"]: int(m["step"]) for m in RESUMED_RE.finditer(att.stdout)}
        for name, step in resumed.items():
            assert state.get(name) is not None and state[name][0] == step, \
                f"{where}: {name} resumed from step {step}, but its last checkpoint was {state.get(name)}"
        if final:  # every unfinished trainer must continue from its last checkpoint
            for name, st in state.items():
                if st is not None and st[0] < st[1]:
                    assert resumed.get(name) == st[0], \
                        f"{where}: {name} did not resume from its checkpoint at step {st[0]}:\n{att.stdout[-2000:]}"

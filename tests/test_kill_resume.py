"""Kill anywhere, rerun, nothing lost: every long command as a subprocess on tiny phantoms.

Each stage (plan_and_preprocess, pretrain, train, predict) is run once uninterrupted (the
reference, built once for the module), then started again from the files before it and
stopped with SIGKILL (or SIGINT, Ctrl-C) at seeded random moments of the reference's active
time and at moments when given files get a new version (a checkpoint, a finished case, a
prediction). After every stop each finished file must read completely (JSON, checkpoints
with ``torch.load(weights_only=True)``, blosc2 arrays, images, PNGs); temporary files of
interrupted writes may exist but the rerun must not trust them. The rerun (``--c``,
``--continue_prediction``, or the same command for plan_and_preprocess) must exit 0, every
trainer must resume from exactly the step of its last checkpoint, and the result must equal
the reference:

- bitwise: preprocessed arrays and case properties, plans.json, fingerprint, predictions
  (values and geometry), and, since CPU training with one thread is deterministic and every
  random draw is seeded by (seed, step), the final (and latest) checkpoints of BPR, diffusion
  and probe training: weights, EMA, optimiser and scheduler states, step, config, logged
  losses; the BPR maps, model.json, probe.json, validation summary and training logs too.
- not compared: PNG figures (only checked to be complete) and wall-clock figures in logs.

Default: per stage one chain of 2 stops (one at a seeded random moment of the reference's
active time, one at a file event), plus one Ctrl-C for pretrain and train (killed, rerun and
killed again, rerun and Ctrl-C'd, rerun to the end), and a deterministic rerun of a pretrain
killed between its last two checkpoint writes. ``--kill-full`` (or ``DIFFPROBE_KILL_FULL=1``)
adds 8 random moments per stage (stratified over the whole run, startup included, each killed
once and rerun) and more file events (mid-write temporary files, the end of a training stage,
between BPR maps, during the final validation, Ctrl-C at other moments).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from kill_checks import (
    assert_same_b2nd,
    assert_same_checkpoint,
    assert_same_files,
    assert_same_image,
    assert_same_json,
    assert_same_log,
)
from kill_harness import KillLab, KillPoint, Stage, stratified_points

pytestmark = pytest.mark.slow

SEED = 20240611
FULL_RANDOM_POINTS = 8
PRE = "preprocessed/Dataset001_Phantoms/diffprobe"
MODEL = "results/pretrained/k"
FOLD = "results/Dataset001_Phantoms/diffprobe/k__fpn/fold_0"
PHANTOMS = ["make_phantoms", "-d", "1", "--num_labelled", "2", "--num_unlabelled", "0", "--num_test", "2",
            "--fov_mm", "60"]


# ---- comparisons with the uninterrupted run ----------------------------------------------------
def _compare_by_kind(ref: Path, got: Path, ignore=lambda _: False) -> None:
    assert_same_files(ref, got, ignore)
    for p in sorted(ref.rglob("*")):
        rel = p.relative_to(ref)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts) or ignore(str(rel)):
            continue
        if p.name.endswith(".jsonl"):
            assert_same_log(p, got / rel)
        elif p.suffix == ".json":
            assert_same_json(p, got / rel)
        elif p.suffix == ".b2nd":
            assert_same_b2nd(p, got / rel)
        elif p.suffix == ".pt":
            assert_same_checkpoint(p, got / rel)
        elif p.name.endswith(".nii.gz"):
            assert_same_image(p, got / rel)


def compare_preprocessed(ref: Path, got: Path) -> None:
    _compare_by_kind(ref / PRE, got / PRE)


def compare_pretrained(ref: Path, got: Path) -> None:
    _compare_by_kind(ref / MODEL, got / MODEL)


def compare_probe(ref: Path, got: Path) -> None:
    _compare_by_kind(ref / FOLD, got / FOLD)
    _compare_by_kind(ref / MODEL, got / MODEL)  # train reads the pretrained model and must not change it


def compare_predictions(ref: Path, got: Path) -> None:
    _compare_by_kind(ref / "pred", got / "pred")


STAGES = {
    "plan_and_preprocess": Stage(
        "plan_and_preprocess", ["plan_and_preprocess", "-d", "1", "-np", "2", "--size_class", "tiny"],
        ["plan_and_preprocess", "-d", "1", "-np", "2", "--size_class", "tiny"], [PRE], compare_preprocessed),
    "pretrain": Stage(
        "pretrain", ["pretrain", "-d", "1", "--name", "k", "--bpr_steps", "4",
                     "--diffusion_steps", "6", "--checkpoint_every", "2"],
        ["pretrain", "-d", "1", "--name", "k", "--bpr_steps", "4",
         "--diffusion_steps", "6", "--checkpoint_every", "2", "--c"],
        [MODEL], compare_pretrained, {f"{MODEL}/bpr": "bpr", f"{MODEL}/diffusion": "diffusion"}),
    "train": Stage(
        "train", ["train", "-d", "1", "-f", "0", "--pretrained", "k", "--steps", "6", "--checkpoint_every", "2"],
        ["train", "-d", "1", "-f", "0", "--pretrained", "k", "--steps", "6", "--checkpoint_every", "2", "--c"],
        [FOLD], compare_probe, {FOLD: "probe fold 0"}),
    "predict": Stage(
        "predict", ["predict", "-i", "raw/Dataset001_Phantoms/imagesTs", "-o", "pred", "-d", "1", "-f", "0"],
        ["predict", "-i", "raw/Dataset001_Phantoms/imagesTs", "-o", "pred", "-d", "1", "-f", "0",
         "--continue_prediction"], ["pred"], compare_predictions),
}
ORDER = ["plan_and_preprocess", "pretrain", "train", "predict"]


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full(request) -> bool:
    return bool(request.config.getoption("--kill-full")) or os.environ.get("DIFFPROBE_KILL_FULL") == "1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> KillLab:
    """Phantoms and the uninterrupted run of every stage, each snapshotted (built once)."""
    lab = KillLab(tmp_path_factory.mktemp("kill_lab"))
    lab.work.mkdir()
    made = lab.run(PHANTOMS)
    assert made.returncode == 0, made.stderr
    lab.snapshot("phantoms")
    before = "phantoms"
    for name in ORDER:
        ref = lab.run_reference(STAGES[name], before)
        lab.log.append(f"reference {name}: {ref.wall_s:.1f}s (first output at {ref.first_output_s or 0:.1f}s)")
        before = name
    yield lab
    print("\n" + "\n".join(lab.log))


def _previous(stage: str) -> str:
    i = ORDER.index(stage)
    return ORDER[i - 1] if i else "phantoms"


def _random_points(lab: KillLab, stage: str, n: int, seed: int, whole_run: bool, upto: float = 1.0):
    """Time points stratified over the reference's run (``whole_run``) or its active part (after
    its first output appeared), up to ``upto`` of its duration."""
    first, duration = lab.active_window(stage)
    return stratified_points(n, 0.0 if whole_run else first, duration * upto, seed)


def _run_single_points(lab: KillLab, stage: str, points: list[KillPoint]) -> list:
    """Each point in its own experiment: stop once, rerun to the end, compare."""
    return [lab.experiment(STAGES[stage], _previous(stage), [p]) for p in points]


def _report(outcomes) -> None:
    for o in outcomes:
        print(o.describe())


# ---- tests ----------------------------------------------------------------------------------------
def test_plan_and_preprocess_killed_anywhere(lab, full):
    """Chain: SIGKILL when the first case is finished (the other is mid-way or queued), rerun and
    SIGKILL at a random moment, rerun to the end."""
    data = f"{PRE}/data"
    chain = [KillPoint(after=(f"{data}/*.json",)),
             *_random_points(lab, "plan_and_preprocess", 1, SEED, whole_run=False, upto=0.75)]
    outcomes = [lab.experiment(STAGES["plan_and_preprocess"], "phantoms", chain)]
    assert [a.killed for a in outcomes[0].attempts] == [True, True, False], outcomes[0].describe()
    if full:
        points = _random_points(lab, "plan_and_preprocess", FULL_RANDOM_POINTS, SEED + 1, whole_run=True)
        points += [KillPoint(after=(f"{data}/.*.tmp*",)),  # mid-write of a case array
                   KillPoint(after=(f"{PRE}/plans.json",)),
                   KillPoint(after=(f"{PRE}/dataset_fingerprint.json",))]
        outcomes += _run_single_points(lab, "plan_and_preprocess", points)
        _require_real_stops(outcomes[1:], points)
    _report(outcomes)


def test_pretrain_killed_and_interrupted(lab, full):
    """Chain: SIGKILL at a random moment, rerun with --c and SIGKILL at its first new checkpoint,
    rerun and Ctrl-C at its first new diffusion checkpoint (exit 130, one line, checkpoint kept),
    rerun to the end; the final checkpoints equal the uninterrupted run's bitwise."""
    ckpts = (f"{MODEL}/bpr/checkpoint_latest.pt", f"{MODEL}/diffusion/checkpoint_latest.pt")
    chain = [*_random_points(lab, "pretrain", 1, SEED + 2, whole_run=False, upto=0.5),
             KillPoint(after=ckpts),
             KillPoint(after=(f"{MODEL}/diffusion/checkpoint_latest.pt",), signal=signal.SIGINT)]
    outcomes = [lab.experiment(STAGES["pretrain"], "plan_and_preprocess", chain)]
    assert [a.killed for a in outcomes[0].attempts] == [True, True, True, False], outcomes[0].describe()
    if full:
        points = _random_points(lab, "pretrain", FULL_RANDOM_POINTS, SEED + 3, whole_run=True)
        points += [KillPoint(after=(f"{MODEL}/bpr/.checkpoint_latest.pt.*",)),  # mid-write
                   KillPoint(after=(f"{MODEL}/bpr/checkpoint_latest.pt",), nth=2),  # end of BPR: latest, no final
                   KillPoint(after=(f"{MODEL}/bpr_maps/*/*.b2nd",)),  # between BPR maps
                   KillPoint(after=(f"{MODEL}/diffusion/.checkpoint_latest.pt.*",)),
                   KillPoint(after=(f"{MODEL}/diffusion/checkpoint_latest.pt",), nth=3),  # end: latest, no final
                   KillPoint(after=(f"{MODEL}/bpr/checkpoint_latest.pt",), signal=signal.SIGINT),
                   KillPoint(delay_s=0.3, after=(f"{MODEL}/diffusion/checkpoint_latest.pt",), nth=2,
                             signal=signal.SIGINT)]
        outcomes += _run_single_points(lab, "pretrain", points)
        _require_real_stops(outcomes[1:], points)
    _report(outcomes)


def test_pretrain_continues_a_run_killed_between_its_last_two_writes(lab):
    """Deterministic form of two narrow windows: the end of a training stage writes checkpoint_latest,
    then checkpoint_final, then the figures. BPR killed between the checkpoints, diffusion between
    checkpoint_final and its loss curve; both with a garbage temporary file of an interrupted
    checkpoint write and log lines of steps after the last checkpoint left behind: --c must write
    the final checkpoint (equal to the reference) and the figures, drop the temporary files and
    the extra log lines."""
    lab.restore("pretrain")
    (lab.work / MODEL / "bpr" / "checkpoint_final.pt").unlink()
    (lab.work / MODEL / "diffusion" / "loss_curve.png").unlink()
    for sub in ("bpr", "diffusion"):
        folder = lab.work / MODEL / sub
        (folder / ".checkpoint_latest.pt.x1y2z3.tmp.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
        log = folder / "training_log.jsonl"
        log.write_text(log.read_text() + '{"step": 999, "loss": 1.0}\n')
    lab.snapshot("pretrain_without_final")
    outcome = lab.experiment(STAGES["pretrain"], "pretrain_without_final", [], resume_first=True)
    _report([outcome])
    assert outcome.checks[-1].temps == []


def test_train_killed_and_interrupted(lab, full):
    """Chain as for pretrain: random SIGKILL, SIGKILL at the rerun's first new checkpoint, Ctrl-C
    at the next one, rerun to the end; the probe equals the uninterrupted one bitwise."""
    latest = (f"{FOLD}/checkpoint_latest.pt",)
    chain = [*_random_points(lab, "train", 1, SEED + 4, whole_run=False, upto=0.4),
             KillPoint(after=latest),
             KillPoint(after=latest, signal=signal.SIGINT)]
    outcomes = [lab.experiment(STAGES["train"], "pretrain", chain)]
    assert [a.killed for a in outcomes[0].attempts] == [True, True, True, False], outcomes[0].describe()
    if full:
        points = _random_points(lab, "train", FULL_RANDOM_POINTS, SEED + 5, whole_run=True)
        points += [KillPoint(after=(f"{FOLD}/.checkpoint_latest.pt.*",)),  # mid-write
                   KillPoint(after=latest, nth=3),  # end of training: latest, maybe no final
                   KillPoint(after=(f"{FOLD}/checkpoint_final.pt",)),  # during the final validation
                   KillPoint(after=(f"{FOLD}/checkpoint_final.pt",), signal=signal.SIGINT),
                   KillPoint(after=latest, nth=2, signal=signal.SIGINT)]
        outcomes += _run_single_points(lab, "train", points)
        _require_real_stops(outcomes[1:], points)
    _report(outcomes)


def test_predict_killed_anywhere(lab, full):
    """Chain: SIGKILL when the first of the two cases is written, rerun with --continue_prediction
    and SIGKILL at a random moment, rerun to the end."""
    chain = [KillPoint(after=("pred/*.nii.gz",)),
             *_random_points(lab, "predict", 1, SEED + 6, whole_run=False, upto=0.75)]
    outcomes = [lab.experiment(STAGES["predict"], "train", chain)]
    assert [a.killed for a in outcomes[0].attempts] == [True, True, False], outcomes[0].describe()
    if full:
        points = _random_points(lab, "predict", FULL_RANDOM_POINTS, SEED + 7, whole_run=True)
        points += [KillPoint(after=("pred/.*.tmp*",))]  # mid-write of a segmentation
        outcomes += _run_single_points(lab, "predict", points)
        _require_real_stops(outcomes[1:], points)
    _report(outcomes)


def _require_real_stops(outcomes, points: list[KillPoint]) -> None:
    """Time points are retried earlier until they stop the command: all must. A file event may be
    missed (a write faster than the 2 ms poll): then the run finished and was compared as well;
    at least 3/4 of all points must have stopped the command."""
    for o, p in zip(outcomes, points):
        if not p.after:
            assert o.real_stops == 1, o.describe()
    assert sum(o.real_stops for o in outcomes) >= 0.75 * len(points), "\n".join(o.describe() for o in outcomes)


def test_ctrl_c_prints_the_one_line_message(lab):
    """Runs after the pretrain/train tests (file order) and reads their Ctrl-C attempts."""
    from kill_harness import INTERRUPT_MESSAGE

    if not lab.interrupted:
        pytest.skip("no Ctrl-C attempt ran (the pretrain/train kill tests were deselected)")
    for att in lab.interrupted:
        assert [ln for ln in att.stderr.splitlines() if ln.strip()] == [INTERRUPT_MESSAGE], att.describe()

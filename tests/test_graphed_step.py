"""The trainer's CUDA-graph step (``pretrain --cuda_graphs``), checked on the CPU.

A capture needs a GPU; here a stand-in 'captures' by running the step body eagerly, warm-up
included, and 'replays' by running it again on the static input buffers. That is enough to check
what the graph path adds around the step: the warm-up's training is undone (parameters, buffers
and the optimiser state, fresh or resumed), the inputs go through static buffers, the schedule and
EMA follow each replay, a failed capture falls back to eager training, and checkpoints stay those
of an eager run. The replayed runs must equal eager runs bit for bit. On a machine with CUDA, the
last test captures for real.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import batches, cfg, killed, make_model
from test_unet3d import TINY_LEVELS, perturb_zero_init

from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.models.unet3d import DiffusionUNet
from diffprobe.pretraining.pretrain import DiffusionLoss
from diffprobe.training import graphed_step
from diffprobe.training.checkpoint import load_checkpoint
from diffprobe.training.graphed_step import GraphedStep, make_capturable, portable_optimizer_state
from diffprobe.training.trainer import Trainer, TrainerConfig


class ToyLoss:
    """test_trainer's loss, split: the step-seeded noise is drawn in ``inputs``, the model runs in ``body``."""

    def inputs(self, batch, step, device):
        x, y = batch
        g = torch.Generator().manual_seed(step)
        return {"x": x.to(device), "y": y.to(device), "noise": (0.01 * torch.randn(y.shape, generator=g)).to(device)}

    def body(self, model, inputs):
        return ((model(inputs["x"]) - inputs["y"] - inputs["noise"]) ** 2).mean()

    def __call__(self, model, batch, step):
        return self.body(model, self.inputs(batch, step, torch.device("cpu"))), {}


class StandInCapture:
    """``capture_on_cuda``'s contract without CUDA: warm-up steps and the 'capture' run the body (and
    train: the graph step must undo that); each replay runs it again on the static inputs."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.captures, self.replays = fail, 0, 0

    def __call__(self, body, device):
        for _ in range(graphed_step.WARMUP_STEPS):
            body()
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        static = body().clone()

        def replay():
            self.replays += 1
            static.copy_(body())

        return replay, static


def graphed(trainer: Trainer, capture: StandInCapture) -> Trainer:
    trainer.graphed = GraphedStep(trainer.model, trainer.optimizer, trainer.loss_fn, trainer.cfg.grad_clip,
                                  trainer.device, None, capture=capture)
    return trainer


def assert_same_training(a: Trainer, b: Trainer) -> None:
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(a.ema.model.state_dict().values(), b.ema.model.state_dict().values()):
        assert torch.equal(x, y)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["lr"] for h in a.history] == [h["lr"] for h in b.history]


def test_replayed_steps_train_exactly_as_eager_ones(tmp_path):
    eager = Trainer(make_model(), ToyLoss(), cfg(30), tmp_path / "eager")
    eager.fit(batches, show_progress=False)
    capture = StandInCapture()
    replayed = graphed(Trainer(make_model(), ToyLoss(), cfg(30), tmp_path / "graphed"), capture)
    replayed.fit(batches, show_progress=False)
    assert capture.captures == 1 and capture.replays == 30  # one capture, every step replayed
    assert_same_training(eager, replayed)  # the warm-up's steps (fresh AdamW state) left no trace
    assert eager.history[-1]["loss"] < 0.5 * eager.history[0]["loss"]  # and it is training, not a no-op


def test_a_resumed_graphed_run_equals_an_uninterrupted_eager_one(tmp_path):
    full = Trainer(make_model(), ToyLoss(), cfg(40), tmp_path / "full")
    full.fit(batches, show_progress=False)
    part = graphed(Trainer(make_model(), ToyLoss(), cfg(40), tmp_path / "part"), StandInCapture())
    with pytest.raises(KeyboardInterrupt):
        part.fit(killed, show_progress=False)
    resumed = Trainer(make_model(), ToyLoss(), cfg(40), tmp_path / "part")
    assert resumed.resume() and resumed.step == 20
    graphed(resumed, StandInCapture()).fit(batches, show_progress=False)  # captured after the resume: its state
    assert_same_training(full, resumed)  # (history: the resumed run's 20 saved records + its own)


def test_a_failed_capture_trains_on_eagerly_with_no_trace_of_the_warm_up(tmp_path):
    eager = Trainer(make_model(), ToyLoss(), cfg(12), tmp_path / "eager")
    eager.fit(batches, show_progress=False)
    capture = StandInCapture(fail=True)
    fallback = graphed(Trainer(make_model(), ToyLoss(), cfg(12), tmp_path / "fallback"), capture)
    fallback.fit(batches, show_progress=False)
    assert fallback.graphed.failed and "capturing" in fallback.graphed.failed and capture.replays == 0
    assert_same_training(eager, fallback)


def test_the_diffusion_step_replays_as_it_trains_eagerly(tmp_path):
    """The real split loss (q_sample, the denoiser, ε-MSE) on a tiny UNet, channels_last as planned."""
    diffusion = GaussianDiffusion(num_timesteps=100)
    loss = DiffusionLoss(diffusion, seed=3, rank=0, channels_last=True)

    def model():
        torch.manual_seed(0)
        net = DiffusionUNet(1, 3, TINY_LEVELS, blocks_per_level=1)
        perturb_zero_init(net)
        return net

    def patches(start):
        step = start
        while True:
            g = torch.Generator().manual_seed(step)
            yield {"image": torch.rand(2, 1, 8, 16, 16, generator=g) * 2 - 1,
                   "guidance": torch.randn(2, 3, 8, 16, 16, generator=g)}
            step += 1

    config = TrainerConfig(total_steps=4, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=1, channels_last=True)
    eager = Trainer(model(), loss, config, tmp_path / "eager")
    eager.fit(patches, show_progress=False)
    replayed = graphed(Trainer(model(), loss, config, tmp_path / "graphed"), StandInCapture())
    replayed.fit(patches, show_progress=False)
    assert_same_training(eager, replayed)
    # the split parts are the loss: body(inputs) is what the eager trainer calls
    batch = next(patches(7))
    inputs = loss.inputs(batch, 7, torch.device("cpu"))
    assert torch.equal(loss(eager.model, batch, 7)[0], loss.body(eager.model, inputs))
    assert inputs["x0"].is_contiguous(memory_format=torch.channels_last_3d)


def test_checkpoints_of_a_capturable_optimiser_are_those_of_an_eager_one():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(4)
    opt.step()
    eager_state = opt.state_dict()
    assert portable_optimizer_state(eager_state) is eager_state  # nothing to change
    make_capturable(opt, torch.device("cpu"))  # what the graph step does on CUDA, after any resume
    group = opt.param_groups[0]
    assert group["capturable"] and isinstance(group["lr"], torch.Tensor) and float(group["lr"]) == pytest.approx(1e-3)
    saved = portable_optimizer_state(opt.state_dict())
    assert saved["param_groups"][0]["capturable"] is False and saved["param_groups"][0]["lr"] == pytest.approx(1e-3)
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=5.0)
    fresh.load_state_dict(saved)  # loads into a plain (CPU, non-capturable) AdamW
    assert fresh.param_groups[0]["lr"] == pytest.approx(1e-3) and not fresh.param_groups[0]["capturable"]


def test_graphed_checkpoint_files_load_weights_only_with_float_learning_rates(tmp_path):
    tr = graphed(Trainer(make_model(), ToyLoss(), cfg(10), tmp_path), StandInCapture())
    make_capturable(tr.optimizer, torch.device("cpu"))  # as on CUDA: a tensor learning rate in the groups
    tr.optimizer.param_groups[0]["capturable"] = False  # AdamW refuses capturable CPU parameters
    tr.fit(batches, show_progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert isinstance(ckpt["optimizer"]["param_groups"][0]["lr"], float)
    assert all(isinstance(v, float) for v in ckpt["scheduler"]["_last_lr"])
    assert all(isinstance(h["lr"], float) for h in tr.history)


def test_graphs_are_refused_with_ddp_or_compile_and_ignored_on_a_cpu(tmp_path):
    with pytest.raises(DiffprobeError, match="one process"):
        graphed_step.check_supported(distributed=True, compiled=False)
    with pytest.raises(DiffprobeError, match="--compile"):
        graphed_step.check_supported(distributed=False, compiled=True)
    graphed_step.check_supported(distributed=False, compiled=False)
    tr = Trainer(make_model(), ToyLoss(), cfg(5, cuda_graphs=True), tmp_path)
    assert tr.graphed is None  # no effect on a CPU, like predict's cuda_graphs
    with pytest.raises(TypeError, match="SplitLoss"):  # a plain loss function cannot be split for a capture
        GraphedStep(tr.model, tr.optimizer, lambda model, batch, step: None, 1.0, tr.device, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph capture needs a GPU")
def test_a_real_capture_trains_like_eager_on_cuda(tmp_path):
    def run(graphs: bool) -> Trainer:
        config = cfg(12, cuda_graphs=graphs, amp=False)
        tr = Trainer(make_model(), ToyLoss(), config, tmp_path / str(graphs), "cuda")
        tr.fit(lambda start: ((x.cuda(), y.cuda()) for x, y in batches(start)), show_progress=False)
        return tr

    eager, replayed = run(False), run(True)
    assert replayed.graphed is not None and replayed.graphed.failed is None
    for a, b in zip(eager.model.state_dict().values(), replayed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_plans_carry_the_setting_off_and_an_override_or_run_flag_turns_it_on():
    from test_unet3d import fingerprint

    from diffprobe.planning.planner import plan
    from diffprobe.planning.plans import apply_override, parse_override
    from diffprobe.pretraining.pretrain import run_plans

    for size in ("tiny", "cpu", "small", "paper"):
        assert plan(fingerprint(), size_class=size)["training"]["cuda_graphs"] is False
    plans = plan(fingerprint(), size_class="tiny")
    apply_override(plans, *parse_override("training.cuda_graphs=true"))  # plan_and_preprocess --override
    assert plans["training"]["cuda_graphs"] is True
    run = run_plans(plan(fingerprint(), size_class="tiny"), {"cuda_graphs": True})  # pretrain --cuda_graphs
    assert run["training"]["cuda_graphs"] is True


def test_a_non_finite_replayed_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    class Exploding(ToyLoss):
        def body(self, model, inputs):
            loss = super().body(model, inputs)
            return loss * torch.where(inputs["x"][0, 0] > 100, float("nan"), 1.0)  # a data-driven NaN

    def batches_with_a_bad_one(start):
        for step, (x, y) in enumerate(batches(start), start):
            yield (x + 1000 if step == 25 else x), y

    tr = graphed(Trainer(make_model(), Exploding(), cfg(40), tmp_path), StandInCapture())
    with pytest.raises(DiffprobeError, match="loss became nan at step 25"):
        tr.fit(batches_with_a_bad_one, show_progress=False)
    assert load_checkpoint(tmp_path / "checkpoint_latest.pt")["step"] == 20
    assert not (tmp_path / "checkpoint_final.pt").exists()

"""The shared trainer: loss decreases, exact resume, budget extension, non-finite stop, safe checkpoints."""

import pytest
import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.training.checkpoint import load_checkpoint
from diffprobe.training.trainer import Trainer, TrainerConfig

TRUE_W = torch.tensor([[1.5, -2.0, 0.5]])


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def batches(start):
    step = start
    while True:
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(16, 3, generator=g)
        yield x, x @ TRUE_W.T
        step += 1


def killed(start, at: int = 25):
    """``batches`` that stop the run with a Ctrl-C when step ``at`` is read."""
    for step, b in enumerate(batches(start), start):
        if step == at:
            raise KeyboardInterrupt
        yield b


def loss_fn(model, batch, step):
    x, y = batch
    g = torch.Generator().manual_seed(step)  # step-seeded randomness (like diffusion noise)
    noise = 0.01 * torch.randn(y.shape, generator=g)
    loss = ((model(x) - y - noise) ** 2).mean()
    return loss, {}


def cfg(steps, **kw):
    return TrainerConfig(total_steps=steps, lr=3e-2, warmup_steps=5, checkpoint_every=10, log_every=5,
                         ema_decay=0.9, **kw)


def test_loss_decreases_and_files(tmp_path):
    tr = Trainer(make_model(), loss_fn, cfg(100), tmp_path, name="toy")
    hist = tr.fit(batches, show_progress=False)
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]
    for f in ("checkpoint_latest.pt", "checkpoint_final.pt", "loss_curve.png", "training_log.jsonl"):
        assert (tmp_path / f).is_file()
    ckpt = load_checkpoint(tmp_path / "checkpoint_final.pt")  # weights_only=True inside
    assert ckpt["step"] == 100 and ckpt["ema"] is not None


def test_resume_equals_uninterrupted(tmp_path):
    full = Trainer(make_model(), loss_fn, cfg(40), tmp_path / "full")
    full.fit(batches, show_progress=False)
    # interrupted run: killed at step 25, after checkpoint_latest was written at step 20
    part = Trainer(make_model(), loss_fn, cfg(40), tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        part.fit(killed, show_progress=False)
    assert not (tmp_path / "part" / "checkpoint_final.pt").exists()
    resumed = Trainer(make_model(), loss_fn, cfg(40), tmp_path / "part")
    assert resumed.resume() and resumed.step == 20
    resumed.fit(batches, show_progress=False)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_can_extend_budget(tmp_path):
    tr = Trainer(make_model(), loss_fn, cfg(20), tmp_path)
    tr.fit(batches, show_progress=False)
    more = Trainer(make_model(), loss_fn, cfg(30), tmp_path)
    assert more.resume() and more.step == 20
    more.fit(batches, show_progress=False)
    assert load_checkpoint(tmp_path / "checkpoint_final.pt")["step"] == 30


def test_non_finite_loss_stops_and_keeps_last_good(tmp_path):
    def exploding(model, batch, step):
        loss, m = loss_fn(model, batch, step)
        return (loss * float("nan") if step == 25 else loss), m

    tr = Trainer(make_model(), exploding, cfg(40), tmp_path)
    with pytest.raises(DiffprobeError, match="loss became nan at step 25"):
        tr.fit(batches, show_progress=False)
    assert load_checkpoint(tmp_path / "checkpoint_latest.pt")["step"] == 20
    assert not (tmp_path / "checkpoint_final.pt").exists()


def test_pickled_checkpoint_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DiffprobeError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "evil.pt")


def test_ema_update_is_the_per_tensor_lerp_bit_for_bit_and_copies_integer_buffers():
    import copy

    from diffprobe.training.trainer import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv3d(8, 4, 1),
                              torch.nn.BatchNorm3d(4))
    ema, reference = EMA(net, 0.99), copy.deepcopy(net)
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[3].running_mean.add_(1.0)
            net[3].num_batches_tracked += 1
        ema.update(net)
        with torch.no_grad():
            for e, m in zip(reference.state_dict().values(), net.state_dict().values()):
                e.lerp_(m, 0.01) if e.dtype.is_floating_point else e.copy_(m)
    got, want = ema.model.state_dict(), reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got["3.num_batches_tracked"].item() == 4
    assert not torch.equal(got["0.weight"], net[0].weight.detach())  # an average, not a copy

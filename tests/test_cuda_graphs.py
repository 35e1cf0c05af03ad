"""predict's CUDA-graph path, checked on the CPU: the captured body (features from noisy inputs made
outside the graph, every head, their mean) reproduces the eager logits, only full tile batches go to
the graph, and a failed capture falls back to eager for good. The capture itself needs a GPU
(benchmarks/gpu_graphs.py measures it there); here a stand-in replays the body directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_predictor_folds import _tiny_probe

from diffprobe.predict import cuda_graphs, ensemble
from diffprobe.predict.acceleration import InferenceSettings
from diffprobe.predict.cuda_graphs import GraphedForward, GraphedGroupLogits
from diffprobe.predict.predictor import Predictor
from diffprobe.probe.features import inference_seed


class ReplayOnCpu:
    """GraphedForward's interface without CUDA: 'capture' records the inputs' signature, 'replay' calls fn."""

    def __init__(self, fn, device, fail: bool = False) -> None:
        self.fn, self.graphs, self.failed, self.fail = fn, {}, None, fail
        self.calls = 0

    def __call__(self, *inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.calls += 1
        self.graphs.setdefault(GraphedForward.signature(inputs), True)
        return self.fn(*inputs).clone()


def _graphed_predictor(monkeypatch, probes, tile_batch: int, fail: bool = False):
    """A Predictor whose group predictors take the graph path on the CPU (stand-in replay)."""
    made = []

    def graphed_forward(fn, device):
        made.append(ReplayOnCpu(fn, device, fail))
        return made[-1]

    monkeypatch.setattr(cuda_graphs, "GraphedForward", graphed_forward)
    monkeypatch.setattr(ensemble, "graphs_supported", lambda device: True)
    settings = InferenceSettings(channels_last=False, tile_batch=tile_batch, cuda_graphs=True)
    return Predictor(probes, "cpu", settings), made


def test_graph_body_reproduces_the_eager_logits_of_a_fold_group(monkeypatch):
    probes = [_tiny_probe(0), _tiny_probe(0)]
    with torch.no_grad():
        for p in probes[1].model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))  # two folds that disagree: the mean of two heads is replayed
    volume = np.random.default_rng(2).uniform(-1, 1, size=(1, 7, 20, 18)).astype(np.float32)
    eager = Predictor(probes, "cpu", InferenceSettings(channels_last=False, tile_batch=2)).logits(
        volume, spacing=[1.0] * 3)
    graphed, made = _graphed_predictor(monkeypatch, probes, tile_batch=2)
    logits = graphed.logits(volume, spacing=[1.0] * 3)
    assert len(made) == 1 and made[0].calls > 0
    assert made[0].failed is None and len(made[0].graphs) == 1  # one signature: the full tile batch
    torch.testing.assert_close(logits, eager, rtol=1e-6, atol=1e-6)


def test_only_full_tile_batches_are_replayed_and_a_failed_capture_falls_back(monkeypatch):
    probe = _tiny_probe(3)
    group = ensemble.group_probes([probe])[0]
    eager_calls = []

    def eager(tiles, gtiles, seeds):
        eager_calls.append(tiles.shape[0])
        return probe.model(tiles, gtiles, seeds).float()

    monkeypatch.setattr(cuda_graphs, "GraphedForward", lambda fn, device: ReplayOnCpu(fn, device))
    graphed = GraphedGroupLogits(group.extractor, [probe.model.head], torch.device("cpu"), torch.float32, 3, eager)
    tiles = torch.randn(3, 1, 4, 8, 8)
    seeds = [inference_seed((0, 0, i)) for i in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(graphed(tiles, None, seeds), eager(tiles, None, seeds), rtol=1e-6, atol=1e-6)
        eager_calls.clear()
        graphed(tiles[:2], None, seeds[:2])  # the window's last, smaller batch
        assert eager_calls == [2] and graphed.graphed.calls == 1

    monkeypatch.setattr(cuda_graphs, "GraphedForward", lambda fn, device: ReplayOnCpu(fn, device, fail=True))
    failing = GraphedGroupLogits(group.extractor, [probe.model.head], torch.device("cpu"), torch.float32, 3, eager)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    eager_calls.clear()
    with torch.no_grad():
        out = failing(tiles, None, seeds)
        failing(tiles, None, seeds)
    assert failing.graphed.failed and "capturing" in failing.graphed.failed
    assert eager_calls == [3, 3]  # eager from the failure on
    torch.testing.assert_close(out, eager(tiles, None, seeds))


def test_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        GraphedForward(lambda x: x, torch.device("cpu"))
    assert not cuda_graphs.graphs_supported(torch.device("cpu"))

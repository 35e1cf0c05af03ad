"""CUDA graphs for predict's tile forward: one launch per tile batch instead of thousands.

Why: on the first GPU day (H200, docs/performance.md) the paper-class window ran at ~18 TFLOP/s, 2 %
of the bf16 peak, and the `tiny` and `cpu` networks took the same time per step as each other. The
GPU waited for the host: a forward of the 3D UNet is a few thousand small kernels, each launched
from Python. A CUDA graph records the whole forward once and replays it with one call.

What is replayed is :meth:`FeatureExtractor.features_of_noisy` plus the group's heads: pure device
work on static input buffers. The tile noise is still drawn on the CPU from the tile's seed
(``features.batch_noise``, the same bits as without graphs) and ``q_sample`` runs eagerly; both sit
outside the graph because they copy host tensors to the device, which a capture forbids.

Only full tile batches are replayed (one graph per input shape, normally one per run); a smaller
last batch runs eagerly. The kernels are the ones the eager forward launches, so the logits are the
same; ``benchmarks/gpu_graphs.py`` measures the agreement and the speed. Measured (H200, paper class,
docs/performance.md "GPU day 2"): logits bit-identical, and no faster (30.4 vs 30.2 ms per tile), since
that window is bound by its kernels. Hence ``InferenceSettings.cuda_graphs`` is off by default; networks
small enough to be launch-bound (the `tiny` and `cpu` classes on a GPU) are where it may pay, unmeasured.

A capture that fails (an operator that cannot be captured, a driver without graph support) is reported once and predict
carries on eagerly. Autocast runs with its weight-cast cache off inside the graph: a cached cast is
freed when the autocast context ends, which a replayed graph would still read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from diffprobe.devices import capture_cuda_graph
from diffprobe.probe.head import mean_logits

log = logging.getLogger(__name__)
WARMUP_CALLS = 2  # eager calls on a side stream before a capture (cuDNN/cuBLAS workspaces, lazy init)


class GraphedForward:
    """``fn(*inputs) -> Tensor`` replayed from a CUDA graph captured for each input signature.

    ``fn`` must be capture-safe: device tensors in, a device tensor out, no host synchronisation.
    Each call copies ``inputs`` into the graph's static buffers, replays, and returns a *copy* of the
    static output (the next replay overwrites it; the sliding window may still hold the last one).
    ``None`` inputs are passed through as ``None``.
    """

    def __init__(self, fn: Callable[..., Tensor], device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn = fn
        self.device = device
        self.graphs: dict[tuple, tuple[list[Tensor | None], Tensor, torch.cuda.CUDAGraph]] = {}
        self.pool = None
        self.failed: str | None = None

    @staticmethod
    def signature(inputs: tuple[Tensor | None, ...]) -> tuple:
        return tuple(None if x is None else (tuple(x.shape), x.stride(), x.dtype) for x in inputs)

    def capture(self, inputs: tuple[Tensor | None, ...]) -> tuple[list[Tensor | None], Tensor, torch.cuda.CUDAGraph]:
        """Warm up on a side stream, then record ``fn`` on copies of ``inputs`` (shared memory pool)."""
        static = [None if x is None else torch.empty_like(x).copy_(x) for x in inputs]
        graph, out = capture_cuda_graph(lambda: self.fn(*static), self.device, WARMUP_CALLS, self.pool)
        self.pool = graph.pool()
        return static, out, graph

    def __call__(self, *inputs: Tensor | None) -> Tensor:
        key = self.signature(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.capture(inputs)
            self.graphs[key] = entry
        static, out, graph = entry
        for buffer, x in zip(static, inputs):
            if buffer is not None:
                buffer.copy_(x, non_blocking=True)
        graph.replay()
        return out.clone()


def graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch.cuda, "CUDAGraph")


class GraphedGroupLogits:
    """The group's mean head logits of a full tile batch, the denoiser and heads replayed as one graph.

    ``extractor`` is the group's ``FeatureExtractor``; ``heads`` its probes' heads; ``dtype`` the
    autocast dtype (float32: none). ``full_batch``: the tile count that is replayed; any other batch
    (the window's last) and everything after a failed capture runs ``eager(tiles, gtiles, seeds)``.
    """

    def __init__(self, extractor: torch.nn.Module, heads: list[torch.nn.Module], device: torch.device,
                 dtype: torch.dtype, full_batch: int,
                 eager: Callable[[Tensor, Tensor | None, list[int]], Tensor]) -> None:
        self.extractor = extractor
        self.heads = heads
        self.device = device
        self.dtype = dtype
        self.full_batch = full_batch
        self.eager = eager
        self.graphed = GraphedForward(self._logits, device)

    def _logits(self, xt: Tensor, t: Tensor, gtiles: Tensor | None) -> Tensor:
        """The captured body: features from the noisy inputs, every head, their mean (float32)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            return mean_logits(self.heads, self.extractor.features_of_noisy(xt, t, gtiles), tuple(xt.shape[2:]))

    def __call__(self, tiles: Tensor, gtiles: Tensor | None, seeds: list[int]) -> Tensor:
        if tiles.shape[0] != self.full_batch or self.graphed.failed:
            return self.eager(tiles, gtiles, seeds)
        xt, t = self.extractor.noisy_inputs(tiles, seeds)  # host noise, eager q_sample (not capturable)
        try:
            return self.graphed(xt, t, gtiles)
        except RuntimeError as e:  # capture or replay refused: the same logits, eagerly, from now on
            self.graphed.failed = f"{type(e).__name__}: {e}"
            self.graphed.graphs.clear()
            log.warning("CUDA graph capture failed (%s); predicting without graphs", self.graphed.failed[:300])
            torch.cuda.synchronize(self.device)
            return self.eager(tiles, gtiles, seeds)

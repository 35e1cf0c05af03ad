"""Inference: whole-volume prediction from patch-wise networks.

``sliding_window.sliding_window_logits`` is the generic Gaussian-weighted tile aggregator (it can
mirror tiles, nnU-Net style; ``predict`` does not: its ``--tta`` is the feature-noise ensemble, see
``ensemble.group_patch_predictor``).  Keep this ``__init__`` light: importing the package must not pull
in heavy dependencies (the sliding-window module imports nnU-Net's helpers lazily).
"""

from diffprobe.predict.sliding_window import PatchPredictor, sliding_window_logits

__all__ = ["PatchPredictor", "sliding_window_logits"]

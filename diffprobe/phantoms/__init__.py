"""Synthetic abdominal CT phantoms with organ labels, written as an nnU-Net v2 raw dataset.

The phantoms give the pipeline a realistic-enough, fully reproducible dataset without any
download: organ intensities overlap so segmentation needs shape and position, and scan geometry
(spacing, field of view along z, body pose) varies per case like real CT.
"""

from diffprobe.phantoms.anatomy import LABELS
from diffprobe.phantoms.generator import PhantomCase, PhantomConfig, generate_case, make_phantom_dataset

__all__ = ["LABELS", "PhantomCase", "PhantomConfig", "generate_case", "make_phantom_dataset"]

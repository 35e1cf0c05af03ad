"""Image IO and physical geometry (SimpleITK based)."""

from diffprobe.io.geometry import Geometry, canonical_orientation, reorient_onto, undo_canonical
from diffprobe.io.image_io import Volume, read_image, read_label, write_image

__all__ = [
    "Geometry",
    "Volume",
    "canonical_orientation",
    "read_image",
    "read_label",
    "reorient_onto",
    "undo_canonical",
    "write_image",
]

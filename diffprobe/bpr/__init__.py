"""Self-supervised body part regressor (BPR): 3D body coordinates that guide the diffusion model.

The paper guides its 3D diffusion model with "universal body-part coordinates" from a pretrained
BPR; none can be downloaded, so diffprobe trains its own on unlabelled preprocessed CT from
overlapping crop pairs with known physical offsets (see docs/bpr.md).  Output channels are
(LR, AP, CC) = world (x, y, z) order.
"""

from diffprobe.bpr.losses import bpr_losses
from diffprobe.bpr.model import BodyPartRegressor, predict_coordinates
from diffprobe.bpr.pairs import CropPair, collate_pairs, extract_crop, sample_crop_pair, sample_far_pair

__all__ = ["BodyPartRegressor", "CropPair", "bpr_losses", "collate_pairs", "extract_crop", "predict_coordinates",
           "sample_crop_pair", "sample_far_pair"]

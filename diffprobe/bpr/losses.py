"""Self-supervised BPR losses: order, distance (with cross-axis leakage), consistency and crop centre.

The network predicts, per low-res cell, scores ``s = (s_LR, s_AP, s_CC)`` (channel order x, y, z).
Points are sampled at continuous positions inside the crops and the maps are read there by
trilinear interpolation (``grid_sample``), so the two crops' low-res grids need not align (the
offset is any integer number of voxels).  Position convention: low-res cell ``p`` sits at voxel
``p * stride + (stride - 1) / 2`` (the same as ``predict_coordinates``' upsampling); points are
kept between the outermost cell centres, so nothing is extrapolated.

All positions are expressed in crop ``a``'s voxel frame (a point at voxel ``j`` of ``b`` is at
``j - offset_vox`` there) and converted to mm with the spacing.  For a pair (u, v) let
``d_k = s_k(v) - s_k(u)`` and ``D_k`` the physical displacement (mm) along axis ``k``:

* order (Yan et al. 2018):   softplus(-sign(D_k) * d_k) = -log sigmoid(+-d_k), pairs with |D_k| >= min_order_mm
* distance:                  huber(d_k - c_k * D_k; beta = c_k * huber_beta_mm)
  + leakage_weight * huber(d_j; beta = c_j * huber_beta_mm) over axis-aligned pairs (move along k only), j != k
* consistency:               huber(s_a(p) - s_b(p); beta) at the same physical points p (a Huber, not a
                             square: a square made the constant map the attractor, docs/bpr.md)
* centre:                    huber(mean(s_b) - mean(s_a) - c_k * D_centre,k; beta) per crop pair: the mean of
                             a linear map over a crop is its value at the crop centre (weight 5 by default:
                             the crop-level position is what the model has to learn)

Formulas, units and the reasons behind them are in docs/bpr.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _huber(err: Tensor, beta: Tensor) -> Tensor:
    """Smooth L1 with a per-channel ``beta`` (broadcast over the last dim)."""
    a = err.abs()
    return torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def _read(out: Tensor, pos_vox: Tensor, crop_vox: Tensor) -> Tensor:
    """Trilinearly read maps ``out`` (B,3,Lz,Ly,Lx) at voxel positions ``pos_vox`` (B,P,3 zyx) -> (B,P,3)."""
    g = 2.0 * (pos_vox + 0.5) / crop_vox - 1.0  # align_corners=False on the full-res grid
    grid = g.flip(-1)[:, :, None, None, :].to(out.dtype)  # grid_sample wants (x, y, z)
    val = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return val[:, :, :, 0, 0].permute(0, 2, 1).float()  # losses in float32 even under autocast


def bpr_losses(model_out_a: Tensor, model_out_b: Tensor, offset_vox: Tensor, spacing_zyx: Tensor,
               total_stride: tuple[int, int, int], scale_per_mm: Tensor, rng_generator: torch.Generator | None = None,
               num_pairs: int = 2048, *, order_weight: float = 1.0, distance_weight: float = 1.0,
               consistency_weight: float = 1.0, leakage_weight: float = 1.0, centre_weight: float = 5.0,
               huber_beta_mm: float = 2.0, min_order_mm: float = 2.0) -> dict[str, Tensor]:
    """Order, distance and consistency losses for a batch of crop pairs; returns them and their weighted total.

    Args:
        model_out_a, model_out_b: (B, 3, Lz, Ly, Lx) model outputs for crops a and b (same shape).
        offset_vox: (B, 3) ``start_a - start_b`` (z, y, x), as from ``collate_pairs``.
        spacing_zyx: (3,) or (B, 3) voxel spacing in mm of the crops' volumes.
        total_stride: the model's (z, y, x) output stride; crops are assumed to be ``L * stride`` voxels.
        scale_per_mm: (3,) or scalar ``c``, **channel order (LR, AP, CC)**: target output units per mm.
            A fixed anchor (e.g. 0.01) or an ``nn.Parameter``; it enters the targets with gradient, the
            Huber/consistency normalisers detached.
        rng_generator: torch generator for the point sampling (its device is used for sampling).
        num_pairs: random pairs per crop pair (a third within a, within b, across); additionally
            ``num_pairs // 4`` axis-aligned pairs (leakage) and ``num_pairs // 4`` consistency points.
            Crops need not overlap (consistency then skips the pair; the other terms hold for any offset).

    Returns:
        ``{"order", "distance", "consistency", "centre", "total"}``, scalars; ``total`` is the weighted sum.
    """
    if model_out_a.shape != model_out_b.shape or model_out_a.ndim != 5 or model_out_a.shape[1] != 3:
        raise ValueError(f"expected two (B,3,z,y,x) outputs of equal shape, got {tuple(model_out_a.shape)} "
                         f"and {tuple(model_out_b.shape)}")
    device, bsz = model_out_a.device, model_out_a.shape[0]
    f32 = dict(device=device, dtype=torch.float32)
    stride = torch.tensor([float(s) for s in total_stride], **f32)
    crop = torch.tensor(model_out_a.shape[2:], **f32) * stride  # crop size in voxels (z, y, x)
    lo, hi = (stride - 1) / 2, crop - 1 - (stride - 1) / 2  # outermost low-res cell centres
    offset = offset_vox.to(**f32).reshape(bsz, 3)
    spacing = spacing_zyx.to(**f32).reshape(-1, 3).expand(bsz, 3)
    c = scale_per_mm.to(device=device, dtype=torch.float32).reshape(-1).expand(3)  # (LR, AP, CC)
    beta = (c.detach().abs() * huber_beta_mm).clamp_min(1e-12)

    gen_device = rng_generator.device if rng_generator is not None else torch.device("cpu")

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=rng_generator, device=gen_device).to(**f32)

    def uniform(n: int) -> Tensor:  # (B, n, 3) positions inside one crop, in its own voxel frame
        return lo + (hi - lo) * rand(bsz, n, 3)

    n3 = max(1, num_pairs // 3)
    n_aa = max(3, num_pairs // 4) // 3 * 3  # axis-aligned pairs, a multiple of 3
    n_cons = max(1, num_pairs // 4)

    # Random pairs: within a, within b, and a->b.  Axis-aligned pairs are read in both crops and
    # the rows alternate between a and b (cheaper than separate reads, same statistics).
    ua, va, ub, vb, xa, xb = (uniform(n3) for _ in range(6))
    aa_u = uniform(n_aa)
    axis = torch.arange(n_aa, device=device) % 3  # moving axis (z, y, x index) of each pair
    moving = F.one_hot(axis, 3).to(torch.bool)[None].expand(bsz, n_aa, 3)
    aa_v = torch.where(moving, uniform(n_aa), aa_u)
    in_a = torch.arange(n_aa, device=device) % 2 == 0
    # Consistency points: anywhere both crops have interior cells, in a's frame.
    c_lo, c_hi = torch.maximum(lo, lo - offset), torch.minimum(hi, hi - offset)  # (B, 3)
    valid = (c_hi >= c_lo).all(dim=1)  # (B,) overlap non-empty
    cp = c_lo[:, None] + (c_hi - c_lo).clamp_min(0)[:, None] * rand(bsz, n_cons, 3)

    pts_a = torch.cat([ua, va, xa, aa_u, aa_v, cp], dim=1)
    pts_b = torch.cat([ub, vb, xb, aa_u, aa_v, cp + offset[:, None]], dim=1)
    sa, sb = _read(model_out_a, pts_a, crop), _read(model_out_b, pts_b, crop)
    i = iter(torch.split(torch.arange(pts_a.shape[1], device=device), [n3, n3, n3, n_aa, n_aa, n_cons]))
    ia_u, ia_v, ia_x, iaa_u, iaa_v, ic = (next(i) for _ in range(6))

    # Random pairs: score differences (channel order) and displacements (mm, reordered to x, y, z).
    d = torch.cat([sa[:, ia_v] - sa[:, ia_u], sb[:, ia_v] - sb[:, ia_u], sb[:, ia_x] - sa[:, ia_x]], dim=1)
    disp = torch.cat([va - ua, vb - ub, (xb - offset[:, None]) - xa], dim=1)
    dmm = (disp * spacing[:, None]).flip(-1)  # (B, P, 3) in channel order (x, y, z)

    # Axis-aligned pairs: rows from a where in_a, else from b.
    sel = in_a[None, :, None]
    d_aa = torch.where(sel, sa[:, iaa_v] - sa[:, iaa_u], sb[:, iaa_v] - sb[:, iaa_u])
    dmm_aa = ((aa_v - aa_u) * spacing[:, None]).flip(-1)
    off_axis = ~moving.flip(-1)  # channels that must not change (channel order)

    # Order: pooled over all pairs and channels with a clear separation along that axis.
    d_all, dmm_all = torch.cat([d, d_aa], dim=1), torch.cat([dmm, dmm_aa], dim=1)
    ordered = dmm_all.abs() >= min_order_mm
    order_terms = F.softplus(-torch.sign(dmm_all) * d_all)
    order = (order_terms * ordered).sum() / ordered.sum().clamp_min(1)

    # Distance (linearity) + leakage (axis-aligned moves leave the other channels unchanged).
    distance = _huber(d - c * dmm, beta).mean()
    leak = (_huber(d_aa, beta) * off_axis).sum() / off_axis.sum().clamp_min(1)
    distance = distance + leakage_weight * leak

    # Consistency: the same physical point in both crops gets the same coordinates.
    err = _huber(sa[:, ic] - sb[:, ic], beta)
    w = valid.to(err.dtype)[:, None, None].expand_as(err)
    consistency = (err * w).sum() / w.sum().clamp_min(1)

    # Centre: the mean of a linear map over a crop is its value at the crop centre (the low-res cells
    # are symmetric about it), so the two crops' means differ by c times the crops' displacement.
    # One term per crop pair for the crop-level (absolute) position, free of the per-point noise of
    # the terms above; it works for overlapping and far-apart crops alike.
    d_centre = model_out_b.float().mean(dim=(2, 3, 4)) - model_out_a.float().mean(dim=(2, 3, 4))
    dmm_centre = (-offset * spacing).flip(-1)  # centre of b minus centre of a, mm, channel order
    centre = _huber(d_centre - c * dmm_centre, beta).mean()

    total = (order_weight * order + distance_weight * distance + consistency_weight * consistency
             + centre_weight * centre)
    return {"order": order, "distance": distance, "consistency": consistency, "centre": centre, "total": total}

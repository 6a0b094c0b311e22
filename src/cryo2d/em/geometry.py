"""Working geometry of a run: the cropped box, Fourier point sets, masks.

The engine works on images Fourier-cropped to the class-average resolution
(``max_res``): a ``work_box`` × ``work_box`` centred Fourier grid with the
frequency spacing of the input box (1 / (box · pixel size) Å⁻¹). Frequencies
are in "Fourier pixels" of that grid (integers at grid points); radii in real
space are in working pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryo2d.em.config import EMConfig
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import radius_grid


@dataclass(frozen=True)
class Geometry:
    """Sizes and radii of one run (all derived from the data and the config).

    Attributes
    ----------
    box : int
        Input image edge, px.
    pixel_size_angst : float
        Input pixel size, Å.
    work_box : int
        Edge of the Fourier-cropped working box, px (even, ≤ box).
    r_max : float
        Class-average radius on the working Fourier grid, Fourier px.
    r_align : float
        Largest E-step radius (max alignment resolution), Fourier px.
    r_min_align : float
        Smallest E-step radius (min alignment resolution high-pass), Fourier px (≥ 1).
    mask_inner_px, mask_outer_px : float
        Soft circular mask radii in working pixels (cosine edge between them).
    particle_diameter_angst : float
        Mask diameter (at most the box), or 0.8 × box when no mask was given, Å.
    """

    box: int
    pixel_size_angst: float
    work_box: int
    r_max: float
    r_align: float
    r_min_align: float
    mask_inner_px: float
    mask_outer_px: float
    particle_diameter_angst: float

    @property
    def work_pixel_angst(self) -> float:
        """Pixel size of the working box, Å."""
        return self.pixel_size_angst * self.box / self.work_box

    def radius_to_angst(self, radius: float) -> float:
        """Resolution (Å) of a working-grid Fourier radius."""
        return self.work_box * self.work_pixel_angst / max(float(radius), 1e-6)

    def angst_to_radius(self, res_angst: float) -> float:
        """Working-grid Fourier radius of a resolution in Å."""
        return self.box * self.pixel_size_angst / float(res_angst)


#: Smallest --mask-diameter, in pixels of the input images.
MIN_MASK_PX = 4
#: Smallest box classified, px.
MIN_BOX = 16


def make_geometry(box: int, pixel_size_angst: float, config: EMConfig) -> Geometry:
    """Derive the working box and radii from the input box and the config."""
    if box < MIN_BOX:
        raise Cryo2DError(f"images of {box} px are too small to classify (need at least {MIN_BOX} px)")
    length_angst = box * pixel_size_angst
    r_res = length_angst / config.max_res_angst
    if r_res >= box / 2 - 1:
        work_box = box
    else:
        work_box = min(box, 2 * math.ceil(r_res) + 4)
        work_box += work_box % 2
    nyquist_r = work_box / 2 - 1
    r_max = min(r_res, nyquist_r)
    align_res = config.max_align_res_angst or config.max_res_angst
    r_align = min(length_angst / align_res, r_max)
    r_min = 1.0
    if config.min_align_res_angst is not None:
        r_min = max(1.0, length_angst / config.min_align_res_angst)
    if r_min + 1 > r_align:
        lowest = (f"--min-align-res {config.min_align_res_angst} Å" if config.min_align_res_angst is not None
                  else f"the box ({length_angst:.0f} Å)")
        flag = "--max-align-res" if config.max_align_res_angst else "--max-res"
        raise Cryo2DError(
            f"{flag} {align_res} Å leaves no frequencies to align with above {lowest} "
            f"({box} px at {pixel_size_angst:.3f} Å)"
        )
    work_px = pixel_size_angst * box / work_box
    if config.mask_diameter_angst is not None:
        if config.mask_diameter_angst < MIN_MASK_PX * pixel_size_angst:
            # --mask-diameter 1 (Å) on 10 Å pixels masked every image to zero: all went to the empty-box class.
            raise Cryo2DError(
                f"--mask-diameter {config.mask_diameter_angst:g} Å is "
                f"{config.mask_diameter_angst / pixel_size_angst:.2g} px at {pixel_size_angst:.3f} Å/px: a mask "
                f"under {MIN_MASK_PX} px leaves no particle to classify (the diameter is in Å)"
            )
        inner = config.mask_diameter_angst / 2 / work_px
        # A mask wider than the box masks nothing; the particle is not wider than the box (the
        # duplicate distance and the angular step follow it: 1e9 Å made every pick a duplicate).
        diameter = min(config.mask_diameter_angst, length_angst)
    else:
        inner = work_box / 2
        diameter = 0.8 * length_angst
    if config.mask_diameter_outer_angst is not None:
        outer = config.mask_diameter_outer_angst / 2 / work_px
    else:
        outer = 1.2 * inner
    if outer < inner:
        if config.mask_diameter_angst is None:
            raise Cryo2DError(
                f"--mask-diameter-outer {config.mask_diameter_outer_angst:g} Å is smaller than the default "
                f"--mask-diameter (the box, {box * pixel_size_angst:.1f} Å): give --mask-diameter too"
            )
        raise Cryo2DError(
            f"--mask-diameter-outer {config.mask_diameter_outer_angst:g} Å must not be smaller than "
            f"--mask-diameter {config.mask_diameter_angst:g} Å"
        )
    return Geometry(
        box=box,
        pixel_size_angst=float(pixel_size_angst),
        work_box=work_box,
        r_max=float(r_max),
        r_align=float(r_align),
        r_min_align=float(r_min),
        mask_inner_px=float(inner),
        mask_outer_px=float(outer),
        particle_diameter_angst=float(diameter),
    )


def soft_mask(box: int, inner_px: float, outer_px: float, *, device=None) -> Tensor:
    """Circular mask: 1 inside ``inner_px``, raised-cosine edge to 0 at ``outer_px``.

    Returns
    -------
    (box, box) float32 tensor, centred on pixel (box//2, box//2).
    """
    r = radius_grid(box, device=device)
    if outer_px <= inner_px:
        return (r <= inner_px).float()
    t = ((r - inner_px) / (outer_px - inner_px)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


@dataclass(frozen=True)
class PointSet:
    """A set of points of the centred working Fourier grid.

    Attributes
    ----------
    flat : (m,) int64
        Indices into the flattened (work_box × work_box) grid.
    xy : (m, 2) float32
        (x, y) frequency of each point, Fourier px.
    shell : (m,) int64
        Rounded radius of each point.
    weight : (m,) float32
        2 for half-plane points standing for a Hermitian pair, else 1.
    """

    flat: Tensor
    xy: Tensor
    shell: Tensor
    weight: Tensor

    def __len__(self) -> int:
        return int(self.flat.numel())

    def subset(self, index: Tensor) -> "PointSet":
        """The points at positions ``index`` (int64), in that order."""
        return PointSet(flat=self.flat[index], xy=self.xy[index], shell=self.shell[index], weight=self.weight[index])


def disc_points(work_box: int, r_lo: float, r_hi: float, *, half: bool, device=None) -> PointSet:
    """Grid points with ``r_lo <= |f| <= r_hi``.

    ``half=True`` keeps one of each Hermitian pair (x > 0, or x = 0 and y > 0)
    with weight 2, so that sums over the half plane equal sums over the full
    plane for transforms of real images; the origin, its own partner, is kept
    (weight 1) when ``r_lo`` is 0.
    """
    c = work_box // 2
    k = torch.arange(work_box, device=device) - c
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    r = torch.sqrt((xx**2 + yy**2).double())
    keep = (r >= r_lo - 1e-9) & (r <= r_hi + 1e-9)
    origin = (xx == 0) & (yy == 0)
    if half:
        keep &= (xx > 0) | ((xx == 0) & (yy > 0)) | origin
    flat = torch.nonzero(keep.flatten()).squeeze(1)
    xy = torch.stack([xx.flatten()[flat], yy.flatten()[flat]], dim=1).float()
    shell = torch.round(r.flatten()[flat]).long()
    weight = torch.full((flat.numel(),), 2.0 if half else 1.0, device=device)
    if half:
        weight[origin.flatten()[flat]] = 1.0
    return PointSet(flat=flat, xy=xy, shell=shell, weight=weight)


def hermitian_grid(values: Tensor, points: PointSet, work_box: int) -> Tensor:
    """Centred (n, box, box) grids from values at half-plane points and their mirrors.

    Parameters
    ----------
    values : (n, m) complex or float tensor
        Values at ``points`` (a half-plane set); the point -f gets the complex
        conjugate of f (the transform of a real image).
    points : PointSet
    work_box : int

    Returns
    -------
    (n, work_box, work_box) tensor of the same dtype, zero elsewhere.
    """
    c = work_box // 2
    x, y = points.xy[:, 0].long(), points.xy[:, 1].long()
    mirror = (c - y) * work_box + (c - x)
    grid = torch.zeros((values.shape[0], work_box * work_box), dtype=values.dtype, device=values.device)
    grid.index_copy_(1, mirror, values.conj() if values.is_complex() else values)  # faster than grid[:, i] = v
    grid.index_copy_(1, points.flat, values)
    return grid.view(-1, work_box, work_box)

"""Synthetic particle images with ground truth, projected from a 3D map.

The map is first solvent-flattened (negative density clipped, density
outside a smooth envelope zeroed: deposited maps are often sharpened, with a
negative halo and streaks), Fourier-resampled to the image pixel size,
cropped or padded to the box and given a soft spherical edge.

Image model (cryo2d conventions, see :mod:`cryo2d.fourier`)::

    X_i = s_i · CTF_i * T_t R_psi P(rot, tilt)  +  coloured noise,   then normalised

- P(rot, tilt) is the projection of the map along z after rotating it with
  RELION's ZYZ Euler matrix A(rot, tilt, 0) (``Euler_angles2matrix``): the
  pixel (x, y) of the projection is Σ_z V(Aᵀ (x, y, z)), with the volume
  indexed [z, y, x] around voxel (n//2, n//2, n//2). The beam direction in
  the map's frame is (sin tilt cos rot, sin tilt sin rot, cos tilt).
- R_psi rotates the projection by ``psi_deg`` counter-clockwise (x right,
  y up), T_t shifts it by ``(shift_x_px, shift_y_px)``:
  ``signal = shift_images(rotate_images(view, psi), shift)``. With RELION's
  A(rot, tilt, psi) the same image is obtained for psi_RELION = −psi_deg
  (RELION's projector samples Aᵀ(x, y, z), i.e. it rotates the image by
  −psi in this convention).
- The protein is bright (positive) in the clean projection and stays bright
  at low frequency after the CTF (CTF(0) = +Q0).
- Noise is Gaussian with a falling spectrum ∝ 1/(1 + (f/f0)²) plus a flat
  floor, scaled so that SNR = var(signal inside the particle circle) /
  var(noise). Each image is then normalised RELION-style: the background
  outside a circle of radius 0.45·box has mean 0 and standard deviation 1.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as nnf
from scipy import ndimage
from torch import Tensor

from cryo2d._callable import make_callable
from cryo2d.ctf import ctf_grid
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import fft2c, freq_grid, ifft2c, radius_grid, rotate_images, shift_images, shift_phase
from cryo2d.io.mrc import write_stack
from cryo2d.io.outputs import atomic_path, make_output_folder, refuse_job_folder, write_json_atomic
from cryo2d.io.star import write_blocks
from cryo2d.particles import CTFParams

__all__ = [
    "MapContentError",
    "SimulatedData",
    "bundled_map_path",
    "dark_map_note",
    "read_map",
    "euler_to_matrix",
    "project",
    "simulate",
    "write_simulation",
]

JUNK_KINDS = ("noise", "ice", "doublet")
_BACKGROUND_RADIUS = 0.45  # × box: RELION-style normalisation outside this circle
_PARTICLE_RADIUS = 0.45  # × box: signal variance for the SNR is measured inside
_CHUNK = 1024  # particles rendered at once, at most
_CHUNK_PIXELS = 1 << 26  # ... and at most this many pixels (fewer particles above 256 px: ~3 GB of temporaries)
#: Largest map, in voxels across, that the resampling to the image pixel size may make (1024³ float64: 8 GiB).
MAX_RESAMPLED = 1024


@dataclass
class SimulatedData:
    """Simulated particles and their ground truth.

    Attributes
    ----------
    images : (n, box, box) float32 ndarray
        Normalised particle images (background mean 0, sd 1), indexed [y, x].
    ctf : CTFParams
        Per-particle CTF (defocus in Å, angle in degrees, kV, Cs mm, Q0).
    pixel_size_angst : float
        Pixel size of ``images`` in Å.
    truth : pandas.DataFrame
        One row per particle: index, kind ("particle", "noise", "ice",
        "doublet"), view (int, −1 for junk), rot_deg, tilt_deg, psi_deg,
        shift_x_px, shift_y_px, scale, defocus_u_angst, defocus_v_angst,
        defocus_angle_deg. Junk rows have NaN angles/shifts (a doublet's
        first component's pose is recorded).
    view_projections : (v, box, box) float32 ndarray
        Clean projections of the views (no CTF, noise, shift; psi = 0), on
        the same scale as the particles' signal before the scale factor: a
        particle of view v is ``scale · shift_images(rotate_images(
        view_projections[v], psi_deg), shift)`` before CTF and noise (exact
        for "discrete" views; for uniform views v is the nearest bin).
    rare_view : int or None
        View id of the rare view; None when it holds no particle (a rare
        view fraction of 0, or a single discrete view).
    meta : dict
        Settings and derived numbers (snr, seed, views mode, noise sd ...).
    """

    images: np.ndarray
    ctf: CTFParams
    pixel_size_angst: float
    truth: pd.DataFrame
    view_projections: np.ndarray
    rare_view: int | None
    meta: dict[str, Any] = field(default_factory=dict)


def bundled_map_path() -> Path:
    """Path of the bundled EMD-1832 map (64³ voxels, 5.7 Å, gzipped MRC; CC0)."""
    return Path(str(resources.files("cryo2d") / "data" / "emd_1832.map.gz"))


_MAX_EDGE_RATIO = 3  # read_map pads a map to a cube only up to this ratio of its longest to its shortest edge


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a 3D map from an MRC file (``.mrc``, ``.map``, ``.gz`` ok) as a cube.

    A map that is not a cube (a filament's or a membrane protein's box is
    often longer along one axis) is zero-padded to its longest edge, keeping
    its centre voxel (index n // 2 on each axis) at the cube's centre (the
    simulator zeroes the solvent anyway), when its edges are at most
    ``_MAX_EDGE_RATIO`` times apart.

    Parameters
    ----------
    path : path-like
        MRC file, or the word ``bundled`` for :func:`bundled_map_path`.

    Returns
    -------
    volume : (n, n, n) float32 ndarray
        Indexed [z, y, x] (a header whose MAPC, MAPR, MAPS name other axes
        is followed); n is the map's longest edge.
    voxel_size_angst : float
        From the header; 0 when the header has none.

    Raises
    ------
    Cryo2DError
        Missing file, not MRC, an image stack, not 3D, edges too far apart,
        voxels of different sizes along the axes, or non-finite values.
    """
    path = bundled_map_path() if str(path) == "bundled" else Path(path)
    if not path.is_file():
        raise Cryo2DError(f"{path}: map file not found")
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            data = None if mrc.data is None else np.asarray(mrc.data, dtype=np.float32)
            # A .mrcs file is a stack; a .mrc header that says "stack" (ISPG 0) is not trusted: cryoDRGN and
            # others write volumes so. A stack of many images fails the edge ratio below.
            stack = data is not None and path.name.lower().endswith((".mrcs", ".mrcs.gz")) and mrc.is_image_stack()
            voxel = round(float(mrc.voxel_size.x), 6)
            sizes = [float(v) for v in (mrc.voxel_size.x, mrc.voxel_size.y, mrc.voxel_size.z) if float(v) > 0]
            axes = tuple(int(mrc.header[name]) for name in ("maps", "mapr", "mapc"))  # the data's axes 0, 1, 2
    except Exception as err:  # mrcfile raises ValueError, OSError, EOFError ...
        raise Cryo2DError(f"{path}: not a readable MRC map ({type(err).__name__}: {err})".splitlines()[0]) from err
    if data is None:
        raise Cryo2DError(f"{path}: not an MRC map (no valid header)")
    if stack:
        raise Cryo2DError(f"{path}: an image stack ({data.shape[0]} images), not a 3D map")
    if data.ndim != 3:
        raise Cryo2DError(f"{path}: not a 3D map (shape {data.shape})")
    if sorted(axes) == [1, 2, 3] and axes != (3, 2, 1):  # sections, rows, columns along other axes than z, y, x
        data = np.ascontiguousarray(np.moveaxis(data, [0, 1, 2], [3 - a for a in axes]))
    if max(data.shape) > _MAX_EDGE_RATIO * min(data.shape):
        raise Cryo2DError(f"{path}: a map of shape {data.shape} is not a particle's (edges more than "
                          f"{_MAX_EDGE_RATIO}x apart); cut the particle out to a box about its size")
    if sizes and max(sizes) > 1.001 * min(sizes):
        raise Cryo2DError(f"{path}: voxels of different sizes along x, y, z ({', '.join(f'{v:g}' for v in sizes)} Å)")
    if not np.isfinite(data).all():
        raise Cryo2DError(f"{path}: map contains NaN or Inf values")
    n = max(data.shape)
    if len(set(data.shape)) != 1:
        before = [n // 2 - m // 2 for m in data.shape]
        data = np.pad(data, [(b, n - m - b) for b, m in zip(before, data.shape)])
    return data, voxel


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def euler_to_matrix(rot_deg: np.ndarray, tilt_deg: np.ndarray, psi_deg: np.ndarray | float = 0.0) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` (ZYZ), vectorised.

    A = Rz(−psi)·Ry(−tilt)·Rz(−rot) with Rz, Ry the usual active rotations.
    A projection samples the map at Aᵀ (x, y, z).

    Parameters
    ----------
    rot_deg, tilt_deg, psi_deg : (m,) array or float
        Euler angles in degrees.

    Returns
    -------
    (m, 3, 3) float64 ndarray
    """
    rot, tilt, psi = np.broadcast_arrays(
        *(np.deg2rad(np.atleast_1d(np.asarray(a, dtype=np.float64))) for a in (rot_deg, tilt_deg, psi_deg))
    )
    ca, sa, cb, sb, cg, sg = np.cos(rot), np.sin(rot), np.cos(tilt), np.sin(tilt), np.cos(psi), np.sin(psi)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty(rot.shape + (3, 3))
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def _directions_to_angles(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit beam directions (m, 3) -> (rot_deg, tilt_deg)."""
    d = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    tilt = np.rad2deg(np.arccos(np.clip(d[:, 2], -1.0, 1.0)))
    rot = np.rad2deg(np.arctan2(d[:, 1], d[:, 0]))
    return rot, tilt


def _angles_to_directions(rot_deg: np.ndarray, tilt_deg: np.ndarray) -> np.ndarray:
    """(rot_deg, tilt_deg) -> unit beam directions (m, 3) in the map's frame."""
    r, t = np.deg2rad(rot_deg), np.deg2rad(tilt_deg)
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)


def _fibonacci_sphere(m: int, *, hemisphere: bool = False) -> np.ndarray:
    """(m, 3) nearly uniform unit vectors (z ≥ 0 only when ``hemisphere``)."""
    i = np.arange(m) + 0.5
    z = 1.0 - i / m if hemisphere else 1.0 - 2.0 * i / m
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def _random_directions(rng: np.random.Generator, m: int) -> np.ndarray:
    v = rng.standard_normal((m, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _jitter(rng: np.random.Generator, direction: np.ndarray, m: int, sd_deg: float) -> np.ndarray:
    """(m, 3) unit vectors scattered around ``direction`` by ~sd_deg degrees."""
    v = direction[None, :] + rng.standard_normal((m, 3)) * np.deg2rad(sd_deg)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------


#: Sample points of one grid_sample call in :func:`project` (about 90 B each: the float64
#: coordinates and their float32 copy, the result): about 1.5 GB at most, one projection of a
#: 256 px box (one slab: the same sums as before slabs; larger boxes are summed in slabs).
_GRID_POINTS = 1 << 24


def _sampling_grid(A: Tensor, z_rows: range, n: int) -> Tensor:
    """grid_sample coordinates of Aᵀ (x, y, z) for output voxels [z, y, x], z in ``z_rows`` (centre n//2).

    Returns (m, len(z_rows), n, n, 3) float32 for the m matrices of ``A``.
    """
    kz = torch.arange(z_rows.start, z_rows.stop, dtype=torch.float64) - n // 2
    ky = kx = torch.arange(n, dtype=torch.float64) - n // 2
    zz, yy, xx = torch.meshgrid(kz, ky, kx, indexing="ij")
    pts = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)  # (p, 3) as (x, y, z)
    src = torch.einsum("pi,mij->mpj", pts, A) + n // 2  # row-vector form of Aᵀ·p
    grid = src * (2.0 / (n - 1)) - 1.0
    return grid.reshape(A.shape[0], len(z_rows), n, n, 3).to(torch.float32)


def project(volume: np.ndarray | Tensor, rot_deg: np.ndarray, tilt_deg: np.ndarray, *, chunk: int = 16) -> Tensor:
    """Real-space projections of a map: rotate (trilinear) and sum along z.

    Parameters
    ----------
    volume : (n, n, n) float array
        Map indexed [z, y, x], centre at voxel (n//2, n//2, n//2).
    rot_deg, tilt_deg : (m,) array
        RELION Euler angles in degrees (psi = 0; rotate the result with
        :func:`cryo2d.fourier.rotate_images` for in-plane rotation).
    chunk : int
        Projections computed at most at once (memory ∝ chunk·n³); fewer, and
        the rotated map summed in slabs of z, where that would exceed
        ``_GRID_POINTS`` samples (boxes above 256).

    Returns
    -------
    (m, n, n) float32 tensor
        P[y, x] = Σ_z V(Aᵀ (x, y, z)), in units of density × voxel; zero
        outside the map.
    """
    vol = torch.tensor(np.asarray(volume), dtype=torch.float32)
    n = vol.shape[-1]
    A = torch.from_numpy(euler_to_matrix(rot_deg, tilt_deg))
    chunk = max(1, min(chunk, _GRID_POINTS // n**3))
    rows = max(1, min(n, _GRID_POINTS // n**2))  # z rows per slab: all of them up to 256 px
    out = []
    for start in range(0, A.shape[0], chunk):
        a = A[start : start + chunk]
        total = None
        for z0 in range(0, n, rows):
            grid = _sampling_grid(a, range(z0, min(n, z0 + rows)), n)
            rotated = nnf.grid_sample(
                vol[None, None].expand(a.shape[0], 1, n, n, n), grid, mode="bilinear",
                padding_mode="zeros", align_corners=True,
            )
            slab = rotated[:, 0].sum(dim=1)
            total = slab if total is None else total + slab
        out.append(total)
    return torch.cat(out) if out else vol.new_zeros((0, n, n))


class _SliceProjector:
    """Fast projections by the Fourier-slice theorem (2× padded, trilinear).

    The map is zero-padded to 2n, pre-divided by the trilinear gridding
    kernel (sinc²) and transformed once; each projection is then one central
    slice (n² samples) and one 2D inverse FFT. Same geometry and scale as
    :func:`project`. Only the half transform of the real map is kept (a slice
    point with negative x frequency reads the conjugate at minus the point),
    in float32, and the padded map is written already in FFT order: a map of
    n voxels takes about 3 · (2n)³ float32 while it is transformed (measured:
    1.5 GB at 256, 4.9 GB at 384) and (2n)³ afterwards.
    """

    def __init__(self, volume: np.ndarray):
        n = volume.shape[-1]
        pad = 2 * n
        o = pad // 2 - n // 2  # the map's first voxel in the centred padded box
        k = (torch.arange(pad, dtype=torch.float64) - pad // 2) / pad
        sinc2 = (torch.sinc(k) ** 2)[o : o + n]
        m = torch.as_tensor(np.asarray(volume, dtype=np.float64))
        m = m / (sinc2[:, None, None] * sinc2[None, :, None] * sinc2[None, None, :])
        # the centred padded map, ifftshifted: voxel o + j goes to (o + j - pad // 2) mod pad
        rows = torch.remainder(torch.arange(n) + o - pad // 2, pad)
        vol = torch.zeros((pad,) * 3, dtype=torch.float32)
        vol[rows[:, None, None], rows[None, :, None], rows[None, None, :]] = m.to(torch.float32)
        del m
        F = torch.fft.rfftn(vol)  # (pad, pad, n + 1): x frequencies 0..n, the others in FFT order
        del vol
        F = torch.fft.fftshift(F, dim=(0, 1))
        self._F = torch.view_as_real(F).permute(3, 0, 1, 2).contiguous()[None]  # (1, 2, pad, pad, n + 1)
        self.n, self.pad = n, pad

    def __call__(self, rot_deg: np.ndarray, tilt_deg: np.ndarray, *, chunk: int = 512) -> Tensor:
        n, pad = self.n, self.pad
        A = torch.from_numpy(euler_to_matrix(rot_deg, tilt_deg))
        j = (torch.arange(n, dtype=torch.float64) - n // 2) * (pad / n)  # 2D freq, padded-index units
        yy, xx = torch.meshgrid(j, j, indexing="ij")
        pts = torch.stack([xx, yy, torch.zeros_like(xx)], dim=-1).reshape(-1, 3)
        chunk = max(1, min(chunk, _GRID_POINTS // n**2))
        # grid_sample's normalised coordinates (align_corners): x from 0 on n + 1 samples, y and z centred on pad
        scale = torch.tensor([2.0 / n, 2.0 / (pad - 1), 2.0 / (pad - 1)], dtype=torch.float64)
        offset = torch.tensor([0.0, pad // 2, pad // 2], dtype=torch.float64)
        out = []
        for start in range(0, A.shape[0], chunk):
            a = A[start : start + chunk]
            src = torch.einsum("pi,mij->mpj", pts, a)  # (m, n², 3) frequency, padded-index units
            neg = src[..., 0] < 0
            src = torch.where(neg[..., None], -src, src)  # F(-k) = conj F(k) for the real map
            grid = ((src + offset) * scale - 1.0).to(torch.float32).reshape(1, a.shape[0], n, n, 3)
            s = nnf.grid_sample(self._F, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
            imag = torch.where(neg.reshape(a.shape[0], n, n), -s[1], s[1])
            out.append(ifft2c(torch.complex(s[0], imag), real=True))
        return torch.cat(out) if out else torch.zeros((0, n, n))


#: dark_map_note speaks when a map's smoothed minimum is more than this many times its smoothed maximum in
#: magnitude. Measured: the bundled map 0.15, EMD-3488 0.32, ASPIRE's 70S 0.43; the three times -1: 6.7, 3.1,
#: 2.3; Gaussian noise maps (200 each) at most 1.7 at 64³, 2.2 at 32³, 3.0 at 12³ (so a note, not an error).
_DARK_RATIO = 2.0


def dark_map_note(volume: np.ndarray) -> str | None:
    """A note when the map's protein looks dark (negative), else None.

    The simulator takes positive density as protein (:func:`_flatten_solvent`
    clips the rest): a map of dark protein simulates its solvent's positive
    noise. Dark = the map smoothed by σ = 2 voxels reaches further below 0
    than ``_DARK_RATIO`` times its maximum.
    """
    smooth = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), 2.0)
    top, bottom = float(smooth.max()), float(smooth.min())
    if top > 0 and -bottom > _DARK_RATIO * top:
        return (f"its strongest density is negative (smoothed: {bottom:.3g}, against {top:.3g} at most): "
                "dark protein? the simulator takes positive density as protein (multiply the map by -1)")
    return None


class MapContentError(Cryo2DError):
    """A map the simulator cannot use for what it holds (``problem``); the command names its file."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"simulate: map: {problem}")
        self.problem = problem


def _flatten_solvent(volume: np.ndarray) -> np.ndarray:
    """Clip negative density and zero the solvent (where the map smoothed by σ = 2 voxels is < 10 % of its peak).

    Deposited maps are often sharpened, with a negative halo and radial streaks
    around the molecule; projected, these would make a dark ring that real
    particles do not have.

    Raises
    ------
    MapContentError
        The smoothed map has no positive value (dark protein, or an empty map).
    """
    smooth = ndimage.gaussian_filter(volume.astype(np.float64), 2.0)
    top = float(smooth.max())
    if not top > 0:  # clipped, nothing would be left: blank "particles"
        raise MapContentError("no positive density (the simulator needs the protein positive; "
                              "a map of dark protein? multiply it by -1)")
    inside = smooth > 0.1 * top
    del smooth  # one map-sized float64 array at a time (large maps)
    mask = ndimage.gaussian_filter(inside.astype(np.float64), 1.0)
    mask *= np.clip(volume, 0.0, None)
    return mask.astype(np.float32)


def _prepare_volume(
    volume: np.ndarray, voxel_size_angst: float, box: int, pixel_size_angst: float | None, *, flatten: bool = True
):
    """Flatten the solvent, resample the map to the image pixel size and box, soft spherical mask.

    Returns the (box, box, box) float32 volume and the exact pixel size (Å).
    """
    n = volume.shape[0]
    if flatten:
        volume = _flatten_solvent(volume)
    if pixel_size_angst is None:
        pixel_size_angst = round(voxel_size_angst * n / box, 9)
    n_new = max(2, int(round(n * voxel_size_angst / pixel_size_angst)))
    if n_new != n:  # Fourier resample in 3D to the nearest whole number of voxels (keeps values' scale)
        # The centred transform's central m³ block, taken from the uncentred one by index (no
        # shifted copy of the whole transform): 16 B a voxel for the transform, the map's copy freed.
        F = torch.from_numpy(np.fft.ifftshift(volume).astype(np.complex128))
        F = torch.fft.fftn(F, out=F)  # in place: the same values as from the real map
        m = min(n, n_new)
        si, so = n // 2 - m // 2, n_new // 2 - m // 2
        rows = torch.from_numpy(np.fft.fftshift(np.arange(n))[si : si + m])  # centred index si + j
        block = F[rows][:, rows][:, :, rows]
        del F
        out = torch.zeros((n_new,) * 3, dtype=block.dtype)
        out[so : so + m, so : so + m, so : so + m] = block
        vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(out))).real * (n_new / n) ** 3
    else:
        vol = torch.as_tensor(np.asarray(volume, dtype=np.float64))
    step = pixel_size_angst / (voxel_size_angst * n / n_new)  # output voxel in resampled voxels
    if abs(step - 1.0) > 1e-9:  # the small remaining ratio: cubic spline onto the exact grid
        k = (np.arange(box) - box // 2) * step + n_new // 2
        coords = np.stack(np.meshgrid(k, k, k, indexing="ij"))
        res = torch.from_numpy(ndimage.map_coordinates(vol.numpy(), coords, order=3, mode="constant"))
    else:  # real-space crop or zero-pad to the box, keeping the centre voxel
        res = torch.zeros((box,) * 3, dtype=torch.float64)
        m = min(n_new, box)
        si, so = n_new // 2 - m // 2, box // 2 - m // 2
        res[so : so + m, so : so + m, so : so + m] = vol[si : si + m, si : si + m, si : si + m]
    # soft spherical mask: the cube's corners would show as rotating squares
    k = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    edge = box / 2 - 1
    mask = torch.clamp((edge - r) / 3.0, 0.0, 1.0)
    mask = 0.5 - 0.5 * torch.cos(math.pi * mask)
    return (res * mask).to(torch.float32).numpy(), float(pixel_size_angst)


# ---------------------------------------------------------------------------
# View selection
# ---------------------------------------------------------------------------


def _rotation_invariant_similarity(projs: Tensor, n_psi: int = 36) -> Tensor:
    """(m, m) max normalised correlation over in-plane rotations and mirrors."""
    m, box = projs.shape[0], projs.shape[-1]
    inside = (radius_grid(box) < box // 2).to(projs.dtype)
    norm = lambda x: (x - x.mean((-2, -1), keepdim=True)) * inside  # noqa: E731
    base = norm(projs).reshape(m, -1)
    base = base / base.norm(dim=1, keepdim=True).clamp_min(1e-12)
    angles = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    variants = []
    for images in (projs, torch.flip(projs, dims=(-1,))):
        rep = images.repeat_interleave(n_psi, dim=0)
        rot = norm(rotate_images(rep, angles.repeat(m), mode="bilinear")).reshape(m * n_psi, -1)
        variants.append((rot / rot.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(m, n_psi, -1))
    var = torch.cat(variants, dim=1)  # (m, 2·n_psi, p)
    return torch.einsum("ap,bvp->abv", base, var).amax(dim=-1)


_VIEW_CACHE: dict[tuple[str, int], tuple[np.ndarray, float]] = {}


def _choose_discrete_views(volume: np.ndarray, n_views: int) -> tuple[np.ndarray, float]:
    """:func:`_select_views`, remembered per (volume bytes, n_views) within the process."""
    key = (hashlib.sha1(np.ascontiguousarray(volume).tobytes()).hexdigest(), int(n_views))
    if key not in _VIEW_CACHE:
        _VIEW_CACHE[key] = _select_views(volume, n_views)
    dirs, max_sim = _VIEW_CACHE[key]
    return dirs.copy(), max_sim


def _select_views(volume: np.ndarray, n_views: int, n_candidates: int = 64) -> tuple[np.ndarray, float]:
    """Greedy choice of ``n_views`` mutually distinct directions on a hemisphere.

    Distinct = low correlation after the best in-plane rotation and mirror
    (a direction and its opposite give mirror images, so only z ≥ 0 is used).
    Deterministic: the views depend on the map only.

    Returns (n_views, 3) unit directions and the largest pairwise similarity.
    """
    cand = _fibonacci_sphere(max(n_candidates, 2 * n_views), hemisphere=True)
    rot, tilt = _directions_to_angles(cand)
    box = volume.shape[0]
    small = volume if box <= 32 else _prepare_volume(volume, 1.0, 32, box / 32, flatten=False)[0]
    projs = project(small, rot, tilt)
    sim = _rotation_invariant_similarity(projs.double())
    sim = torch.maximum(sim, sim.T)
    sim.fill_diagonal_(-1.0)
    chosen = [int(torch.argmin(sim.max(dim=1).values))]
    while len(chosen) < n_views:
        worst = sim[:, chosen].max(dim=1).values
        worst[chosen] = float("inf")
        chosen.append(int(torch.argmin(worst)))
    sub = sim[chosen][:, chosen]
    max_sim = float(sub.max()) if n_views > 1 else 0.0
    return cand[chosen], max_sim


# ---------------------------------------------------------------------------
# Noise, CTF, junk
# ---------------------------------------------------------------------------


def _noise_filter(box: int) -> Tensor:
    """(box, box) amplitude filter on the centred grid: sqrt of 1/(1+(f/f0)²) + floor."""
    f = radius_grid(box, dtype=torch.float64) / box  # cycles/px
    f0, floor = 0.08, 0.15
    power = 1.0 / (1.0 + (f / f0) ** 2) + floor
    return torch.sqrt(power / power.mean())


def _coloured_noise(rng: np.random.Generator, n: int, box: int) -> Tensor:
    """(n, box, box) float32 Gaussian noise with the falling spectrum, each image's variance 1."""
    white = torch.from_numpy(rng.standard_normal((n, box, box), dtype=np.float32))
    noise = ifft2c(fft2c(white) * _noise_filter(box).to(torch.float32), real=True)
    return noise / noise.std(dim=(-2, -1), keepdim=True)


def _shift_scale_ctf(
    images: Tensor, shifts_px: np.ndarray, scale: np.ndarray, ctf: CTFParams, pixel_size_angst: float
) -> Tensor:
    """(m, box, box) float32: shift (Fourier phase), multiply by scale and CTF, in one FFT pair.

    Equals ``scale · ifft2c(fft2c(shift_images(images, shifts_px)) · CTF)`` (periodic boundary).
    """
    m, box = images.shape[0], images.shape[-1]
    freqs = freq_grid(box, dtype=torch.float64).reshape(-1, 2)
    phase = shift_phase(freqs, torch.from_numpy(np.asarray(shifts_px, dtype=np.float64))).reshape(m, box, box)
    H = ctf_grid(ctf, box, pixel_size_angst, dtype=torch.float64) * torch.from_numpy(np.asarray(scale))[:, None, None]
    return ifft2c(fft2c(images) * (phase * H).to(torch.complex64), real=True)


def _shift_no_wrap(images: Tensor, shifts_px: np.ndarray) -> Tensor:
    """Fourier shift on a 2× zero-padded canvas, so content leaving the box is lost, not wrapped."""
    box = images.shape[-1]
    lo = box // 2
    padded = nnf.pad(images, (lo, box - lo, lo, box - lo))
    moved = shift_images(padded, torch.from_numpy(np.asarray(shifts_px, dtype=np.float64)))
    return moved[..., lo : lo + box, lo : lo + box]


def _ice_images(rng: np.random.Generator, n: int, box: int) -> Tensor:
    """(n, box, box) ice-like contamination: smooth large blobs plus a gradient, unit sd."""
    if n == 0:
        return torch.zeros((0, box, box), dtype=torch.float64)
    k = torch.arange(box, dtype=torch.float64) - box // 2
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    out = torch.zeros((n, box, box), dtype=torch.float64)
    for i in range(n):
        img = torch.zeros((box, box), dtype=torch.float64)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(-0.6, 0.6, 2) * box
            rad = rng.uniform(0.2, 0.5) * box
            amp = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 3.0)
            img += amp / (1.0 + torch.exp(((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() / (0.08 * box) - rad / (0.08 * box)))
        gx, gy = rng.normal(0.0, 1.0, 2) / box
        img += gx * xx + gy * yy
        out[i] = img
    out = out - out.mean((-2, -1), keepdim=True)
    return (out / out.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)).to(torch.float32)


def _normalise_background(images: Tensor) -> Tensor:
    """RELION-style: pixels outside radius 0.45·box get mean 0, sd 1."""
    box = images.shape[-1]
    bg = radius_grid(box, dtype=images.dtype) > _BACKGROUND_RADIUS * box
    vals = images[:, bg]
    mean = vals.mean(dim=1)[:, None, None]
    sd = vals.std(dim=1, unbiased=False).clamp_min(1e-12)[:, None, None]
    return (images - mean) / sd


def _clean_signal(view_projections: Tensor, view: np.ndarray, psi_deg: np.ndarray, shift_px: np.ndarray) -> Tensor:
    """(m, box, box) ``shift_images(rotate_images(view_projections[view], psi), shift)``: the truth."""
    base = view_projections[torch.as_tensor(view, dtype=torch.int64)]
    rotated = rotate_images(base, torch.as_tensor(psi_deg, dtype=torch.float64))
    return shift_images(rotated, torch.as_tensor(shift_px, dtype=torch.float64))


# ---------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------


def _split_counts(total: int, k: int) -> list[int]:
    base, extra = divmod(total, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def simulate(
    volume: np.ndarray,
    voxel_size_angst: float,
    *,
    n_particles: int = 1000,
    box: int = 64,
    pixel_size_angst: float | None = None,
    snr: float = 0.1,
    junk_fraction: float = 0.1,
    views: str = "discrete",
    n_views: int = 8,
    rare_view_fraction: float = 0.03,
    scale_sd: float = 0.1,
    defocus_range_angst: tuple[float, float] = (10000.0, 30000.0),
    max_astigmatism_angst: float = 1000.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    max_shift_px: float | None = None,
    add_noise: bool = True,
    seed: int = 0,
) -> SimulatedData:
    """Simulate particle images with CTF, noise, junk and ground truth.

    Parameters
    ----------
    volume : (n, n, n) float array
        Map indexed [z, y, x] (as read by ``mrcfile``), centred at voxel n//2,
        protein positive.
    voxel_size_angst : float
        Voxel size of ``volume`` in Å.
    n_particles : int
        Number of images, junk included.
    box : int
        Image edge in px.
    pixel_size_angst : float, optional
        Image pixel size in Å; default ``voxel_size_angst · n / box`` (the
        map's box fills the image). The map is Fourier-resampled to the
        nearest whole number of voxels, then spline-interpolated to exactly
        this pixel size.
    snr : float
        Variance of the CTF-modulated signal inside the circle of radius
        0.45·box over the noise variance (per particle; scale factor and
        CTF included). ``inf`` or ``add_noise=False``: no noise. With no
        particles (``junk_fraction`` 1) the doublets' first components, as
        lone particles, are the signal.
    junk_fraction : float
        Fraction of all images that are junk, split equally into "noise",
        "ice" and "doublet".
    views : {"discrete", "uniform", "preferred"}
        "discrete": ``n_views`` distinct directions (chosen so that no two
        views look alike after in-plane rotation or mirroring); the last is
        the rare view with ``rare_view_fraction`` of the non-junk
        particles, the others equally likely. "uniform": directions uniform
        on the sphere, view id = nearest of ``n_views`` Fibonacci bin
        directions, plus a rare view (id ``n_views``) at one fixed direction
        (±2° jitter) with ``rare_view_fraction`` of the particles.
        "preferred": as "uniform" plus a preferred direction (id
        ``n_views``, ±2°) holding half the non-junk particles; the rare view
        is id ``n_views + 1``.
    n_views : int
        Number of discrete views or uniform bins.
    rare_view_fraction : float
        Fraction of the non-junk particles in the rare view (count rounded),
        below 1. With 0 (or a single discrete view, which takes every
        particle) there is no rare view: ``rare_view`` is None.
    scale_sd : float
        Standard deviation of log(scale); scale is lognormal around 1.
    defocus_range_angst : (float, float)
        Mean defocus drawn uniformly in this range, Å (positive = underfocus).
    max_astigmatism_angst : float
        U − V drawn uniformly in [0, this], Å; angle uniform in [0, 180)°.
    voltage_kv, cs_mm, amplitude_contrast : float
        Optics (kV, mm, fraction).
    max_shift_px : float, optional
        Shifts are uniform in a disc of this radius in px; default 0.03·box.
    add_noise : bool
        False: images are the clean CTF-modulated signal (not normalised).
    seed : int
        Seed of ``numpy.random.default_rng``; same seed, same output.

    Returns
    -------
    SimulatedData

    Raises
    ------
    Cryo2DError
        A setting out of range, or (:class:`MapContentError`, whose messages
        begin ``simulate: map:``) a map with no positive density.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise Cryo2DError(f"simulate: volume must be a cube, got shape {volume.shape}")
    if not voxel_size_angst or not 0 < voxel_size_angst < math.inf:
        raise Cryo2DError("simulate: voxel size must be positive (the map header has none; pass it)")
    if views not in ("discrete", "uniform", "preferred"):
        raise Cryo2DError(f"simulate: views must be discrete, uniform or preferred, got {views!r}")
    if n_particles < 1 or box < 8 or n_views < 1:
        raise Cryo2DError("simulate: need n_particles ≥ 1, box ≥ 8 and n_views ≥ 1")
    for name, value in (("junk fraction", junk_fraction), ("rare view fraction", rare_view_fraction)):
        if not 0 <= value <= 1:
            raise Cryo2DError(f"simulate: {name} must be in [0, 1], got {value}")
    if rare_view_fraction == 1:
        raise Cryo2DError("simulate: rare view fraction must be below 1 (the other views need particles)")
    n_real = n_particles - int(round(junk_fraction * n_particles))  # as counted below
    if views == "preferred" and int(round(rare_view_fraction * n_real)) > n_real - n_real // 2:
        raise Cryo2DError(f"simulate: rare view fraction {rare_view_fraction:g} with preferred views, which put half "
                          "the particles in the preferred view: at most 0.5")
    low, high = (float(v) for v in defocus_range_angst)
    if not -math.inf < low <= high < math.inf:
        raise Cryo2DError(f"simulate: defocus range must be two finite values, low then high, got {defocus_range_angst}")
    for name, value, ok, allowed in (  # values the CTF or the draws cannot take (NaN images, numpy tracebacks)
        ("voltage", voltage_kv, 0 < voltage_kv < math.inf, "positive and finite"),
        ("spherical aberration", cs_mm, -math.inf < cs_mm < math.inf, "finite"),
        ("amplitude contrast", amplitude_contrast, 0 <= amplitude_contrast < 1, "in [0, 1)"),
        ("maximum astigmatism", max_astigmatism_angst, 0 <= max_astigmatism_angst < math.inf, "finite, from 0"),
        ("scale sd", scale_sd, 0 <= scale_sd < math.inf, "finite, from 0"),
        ("maximum shift", max_shift_px, max_shift_px is None or 0 <= max_shift_px < math.inf, "finite, from 0"),
    ):
        if not ok:
            raise Cryo2DError(f"simulate: {name} must be {allowed}, got {value}")
    if not snr > 0:  # inf: no noise; NaN refused
        raise Cryo2DError(f"simulate: snr must be positive, got {snr}")
    if pixel_size_angst is not None and not 0 < pixel_size_angst < math.inf:
        raise Cryo2DError(f"simulate: pixel size must be positive and finite, got {pixel_size_angst}")
    if pixel_size_angst is not None and volume.shape[0] * voxel_size_angst / pixel_size_angst > MAX_RESAMPLED:
        raise Cryo2DError(
            f"simulate: a pixel size of {pixel_size_angst:g} Å would resample the map ({volume.shape[0]} voxels of "
            f"{voxel_size_angst:g} Å) to more than {MAX_RESAMPLED} voxels across"
        )
    # The map scaled by a power of 2 (exact in floating point) to a largest value in [0.5, 1): the same images
    # whatever its units (a map in units of 1e-12 gave images left unnormalised and views chosen at random).
    unit_exp = math.frexp(float(np.abs(volume).max()))[1] if volume.size else 0
    volume = np.ldexp(volume, -unit_exp)
    rng = np.random.default_rng(seed)
    vol, pixel = _prepare_volume(volume, float(voxel_size_angst), int(box), pixel_size_angst)
    max_shift = 0.03 * box if max_shift_px is None else float(max_shift_px)

    # -- how many of each kind ------------------------------------------------
    n_junk = int(round(junk_fraction * n_particles))
    n_part = n_particles - n_junk
    junk_counts = _split_counts(n_junk, 3)
    kinds = np.array(["particle"] * n_part + sum(([k] * c for k, c in zip(JUNK_KINDS, junk_counts)), []), dtype=object)
    n_rare = int(round(rare_view_fraction * n_part))

    # -- directions and view ids of the real particles ---------------------------
    if views == "discrete":
        dirs, max_sim = _choose_discrete_views(vol, n_views)
        rare_view = n_views - 1
        counts = [n_part - n_rare] if n_views == 1 else _split_counts(n_part - n_rare, n_views - 1)
        view = np.concatenate([np.full(c, v) for v, c in enumerate(counts)] + [np.full(n_rare, rare_view)])
        if n_views == 1:
            view = np.full(n_part, 0)
        part_dirs = dirs[view]
        view_dirs = dirs
    else:
        bins = _fibonacci_sphere(n_views)
        special = [np.array([0.62, -0.35, 0.70])]  # the rare view's fixed direction
        if views == "preferred":
            special.insert(0, np.array([0.0, 0.0, 1.0]))
        special = [d / np.linalg.norm(d) for d in special]
        rare_view = n_views + len(special) - 1
        n_pref = n_part // 2 if views == "preferred" else 0
        n_uni = n_part - n_rare - n_pref
        uni = _random_directions(rng, n_uni)
        parts = [uni]
        view = [np.argmax(uni @ bins.T, axis=1)]
        if n_pref:
            parts.append(_jitter(rng, special[0], n_pref, 2.0))
            view.append(np.full(n_pref, n_views))
        parts.append(_jitter(rng, special[-1], n_rare, 2.0))
        view.append(np.full(n_rare, rare_view))
        part_dirs, view = np.concatenate(parts), np.concatenate(view)
        view_dirs = np.concatenate([bins, np.stack(special)])
        max_sim = None
    view_rot, view_tilt = _directions_to_angles(view_dirs)
    view_projections = project(vol, view_rot, view_tilt)

    # -- per-image random draws (fixed order for reproducibility) ----------------
    n = n_particles
    psi = rng.uniform(0.0, 360.0, n)
    rad = max_shift * np.sqrt(rng.uniform(0.0, 1.0, n))
    ang = rng.uniform(0.0, 2 * math.pi, n)
    shifts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=-1)
    scale = np.exp(rng.normal(0.0, scale_sd, n))
    mean_df = rng.uniform(*defocus_range_angst, n)
    astig = rng.uniform(0.0, max_astigmatism_angst, n)
    ctf = CTFParams(
        defocus_u_angst=mean_df + astig / 2,
        defocus_v_angst=mean_df - astig / 2,
        defocus_angle_deg=rng.uniform(0.0, 180.0, n),
        voltage_kv=np.full(n, float(voltage_kv)),
        cs_mm=np.full(n, float(cs_mm)),
        amplitude_contrast=np.full(n, float(amplitude_contrast)),
        phase_shift_deg=np.zeros(n),
        bfactor_angst2=np.zeros(n),
    )
    # doublets: two random directions, the second offset by ~0.6 particle diameter
    n_doublet = junk_counts[2]
    doublet_dirs = _random_directions(rng, 2 * n_doublet)
    doublet_psi2 = rng.uniform(0.0, 360.0, n_doublet)
    diameter_px = _particle_diameter_px(vol)
    off_ang = rng.uniform(0.0, 2 * math.pi, n_doublet)
    off = 0.6 * diameter_px * np.stack([np.cos(off_ang), np.sin(off_ang)], axis=-1)

    # -- clean signal, CTF and noise, in chunks of particles ---------------------
    rot = np.full(n, np.nan)
    tilt = np.full(n, np.nan)
    view_all = np.full(n, -1)
    rot_p, tilt_p = _directions_to_angles(part_dirs) if n_part else (np.zeros(0), np.zeros(0))
    rot[:n_part], tilt[:n_part], view_all[:n_part] = rot_p, tilt_p, view
    projector = _SliceProjector(vol) if (views != "discrete" and n_part) or n_doublet else None
    d0 = n_part + junk_counts[0] + junk_counts[1]
    if n_doublet:
        r2, t2 = _directions_to_angles(doublet_dirs)
        rot[d0:], tilt[d0:] = r2[0::2], t2[0::2]
    signal = torch.zeros((n, box, box), dtype=torch.float32)
    chunk = max(1, min(_CHUNK, _CHUNK_PIXELS // box**2))
    inside = radius_grid(box) <= _PARTICLE_RADIUS * box
    solo_var = []  # with no particles: the SNR's reference, a lone particle at each doublet's first pose
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        rotated = torch.zeros((len(idx), box, box), dtype=torch.float32)
        part = idx[idx < n_part]
        if len(part) and views == "discrete":
            rotated[: len(part)] = rotate_images(view_projections[view[part]], torch.from_numpy(psi[part]))
        elif len(part):
            raw = projector(rot_p[part], tilt_p[part])
            rotated[: len(part)] = rotate_images(raw, torch.from_numpy(psi[part]))
        dbl = idx[idx >= d0] - d0
        if len(dbl):
            pick = np.stack([2 * dbl, 2 * dbl + 1], axis=1).reshape(-1)
            raw = projector(r2[pick], t2[pick]).reshape(len(dbl), 2, box, box)
            first = rotate_images(raw[:, 0], torch.from_numpy(psi[d0 + dbl]))
            second = rotate_images(raw[:, 1], torch.from_numpy(doublet_psi2[dbl]))
            pair = _shift_no_wrap(first, -off[dbl] / 2) + _shift_no_wrap(second, off[dbl] / 2)
            rotated[len(idx) - len(dbl) :] = pair
            if not n_part:
                solo = _shift_scale_ctf(first, shifts[d0 + dbl], scale[d0 + dbl], ctf.subset(d0 + dbl), pixel)
                solo_var.append(solo[:, inside].double().var(dim=1))
        signal[idx] = _shift_scale_ctf(rotated, shifts[idx], scale[idx], ctf.subset(idx), pixel)

    order = rng.permutation(n)  # drawn before the noise: clean and noisy runs share the truth
    if n_part:
        ref_var = float(signal[:n_part][:, inside].double().var(dim=1).mean())
    else:  # junk only: the doublets at the SNR their particles would have (a noise or ice image is normalised anyway)
        ref_var = float(torch.cat(solo_var).mean()) if solo_var else 1.0
    noise_sd = math.sqrt(ref_var / snr) if math.isfinite(snr) else 0.0
    if add_noise and noise_sd > 0:
        images = signal
        n_ice, i0 = junk_counts[1], n_part + junk_counts[0]
        ice_amp = rng.uniform(1.0, 3.0, n_ice)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            noise = _coloured_noise(rng, sl.stop - sl.start, box)
            images[sl] += noise_sd * noise
        if n_ice:
            images[i0 : i0 + n_ice] += _ice_images(rng, n_ice, box) * torch.from_numpy(noise_sd * ice_amp[:, None, None]).float()
        images = _normalise_background(images)
    else:
        images = signal

    # -- shuffle and assemble ------------------------------------------------------
    posed = np.isin(kinds[order], ["particle", "doublet"])
    true_shift = shifts.astype(np.float64)  # a doublet's: its first component's, drawn off/2 from the pair's centre
    if n_doublet:
        true_shift[d0:] -= off / 2
    truth = pd.DataFrame(
        {
            "index": np.arange(n),
            "kind": kinds[order].astype(str),
            "view": view_all[order].astype(np.int64),
            "rot_deg": rot[order],
            "tilt_deg": tilt[order],
            "psi_deg": np.where(posed, psi[order], np.nan),
            "shift_x_px": np.where(posed, true_shift[order, 0], np.nan),
            "shift_y_px": np.where(posed, true_shift[order, 1], np.nan),
            "scale": scale[order],
            "defocus_u_angst": ctf.defocus_u_angst[order],
            "defocus_v_angst": ctf.defocus_v_angst[order],
            "defocus_angle_deg": ctf.defocus_angle_deg[order],
        }
    )
    meta = {
        "snr": float(snr),
        "seed": int(seed),
        "views": views,
        "n_views": int(n_views),
        "n_particles": int(n),
        "box": int(box),
        "pixel_size_angst": pixel,
        "voxel_size_angst": float(voxel_size_angst),
        "junk_fraction": float(junk_fraction),
        "rare_view_fraction": float(rare_view_fraction),
        "noise_sd": math.ldexp(noise_sd, unit_exp),  # in the map's units
        "signal_variance": math.ldexp(ref_var, 2 * unit_exp),
        "particle_diameter_px": diameter_px,
        "particle_diameter_angst": diameter_px * pixel,
        "max_view_similarity": max_sim,
        "view_rot_deg": view_rot.tolist(),
        "view_tilt_deg": view_tilt.tolist(),
    }
    return SimulatedData(
        images=_in_map_units(images[torch.from_numpy(order)].numpy(), 0 if add_noise and noise_sd > 0 else unit_exp),
        ctf=ctf.subset(order),
        pixel_size_angst=pixel,
        truth=truth,
        view_projections=_in_map_units(view_projections.numpy(), unit_exp),
        rare_view=int(rare_view) if n_rare and not (views == "discrete" and n_views == 1) else None,
        meta=meta,
    )


def _in_map_units(images: np.ndarray, exp: int) -> np.ndarray:
    """``images`` · 2**exp (exact), float32; the unscaled array when exp is 0."""
    return images if exp == 0 else np.ldexp(images, exp).astype(np.float32)


def _particle_diameter_px(volume: np.ndarray) -> float:
    """Largest extent of the density above 20 % of its maximum, as 2 × max radius, px."""
    n = volume.shape[0]
    pts = np.argwhere(volume > 0.2 * volume.max())
    if len(pts) == 0:
        return n / 2
    return float(2 * np.sqrt(((pts - n // 2) ** 2).sum(axis=1)).max())


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _refuse_foreign_folder(out: Path) -> None:
    """Cryo2DError for a folder whose particle files a simulation would replace: a classification
    job's (its results), or one holding particle files of no earlier simulation (real data)."""
    if not out.is_dir():
        return
    refuse_job_folder(out)
    if not (out / "truth.json").is_file():
        held = next((name for name in ("particles.star", "particles.mrcs") if (out / name).exists()), None)
        if held is not None:
            raise Cryo2DError(f"{out}: holds {held}, not from cryo2d simulate (no truth.json); choose another folder")


def write_simulation(sim: SimulatedData, out_dir: str | os.PathLike) -> Path:
    """Write a simulation as RELION 3.1 files plus ground truth.

    Files in ``out_dir`` (created; each written atomically):
    ``particles.mrcs`` (float32, pixel size in the header), ``particles.star``
    (``data_optics`` + ``data_particles``, ``000001@particles.mrcs`` 1-based),
    ``truth.csv`` (``sim.truth``), ``views.mrcs`` (``sim.view_projections``)
    and ``truth.json`` (rare_view, n_views, pixel_size_angst, snr, seed ...).
    An earlier simulation's folder is written over; a folder holding a
    classification job, or particle files without ``truth.json``, is refused
    (``Cryo2DError``).

    Returns
    -------
    Path
        ``out_dir``.
    """
    _refuse_foreign_folder(Path(out_dir))
    out = make_output_folder(out_dir)
    n, box = sim.images.shape[0], sim.images.shape[-1]
    pixel = float(sim.pixel_size_angst)

    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnVoltage": [float(sim.ctf.voltage_kv[0])],
            "rlnSphericalAberration": [float(sim.ctf.cs_mm[0])],
            "rlnAmplitudeContrast": [float(sim.ctf.amplitude_contrast[0])],
            "rlnImagePixelSize": [pixel],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )
    # each particle on its own grid site of fake micrographs of 100 particles
    site = np.arange(n)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
            "rlnMicrographName": [f"sim_micrograph_{i // 100:04d}.mrc" for i in site],
            "rlnCoordinateX": ((site % 10) * 2 * box + box).astype(np.float64),
            "rlnCoordinateY": (((site % 100) // 10) * 2 * box + box).astype(np.float64),
            "rlnDefocusU": sim.ctf.defocus_u_angst,
            "rlnDefocusV": sim.ctf.defocus_v_angst,
            "rlnDefocusAngle": sim.ctf.defocus_angle_deg,
            "rlnPhaseShift": sim.ctf.phase_shift_deg,
            "rlnCtfBfactor": sim.ctf.bfactor_angst2,
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        }
    )
    info = {
        "rare_view": sim.rare_view,
        "n_views": int(sim.view_projections.shape[0]),
        "pixel_size_angst": pixel,
        "snr": sim.meta.get("snr"),
        "seed": sim.meta.get("seed"),
        **{k: v for k, v in sim.meta.items() if k not in ("snr", "seed", "n_views")},
    }
    write_stack(out / "particles.mrcs", sim.images, pixel, label="cryo2d simulate")
    write_stack(out / "views.mrcs", sim.view_projections, pixel, label="cryo2d simulate")
    write_blocks({"optics": optics, "particles": particles}, out / "particles.star", creator="cryo2d simulate")
    with atomic_path(out / "truth.csv") as tmp:
        sim.truth.to_csv(tmp, index=False)
    write_json_atomic(out / "truth.json", info)
    return out


make_callable(__name__)  # cryo2d.simulate(...) calls simulate above (cryo2d._callable)

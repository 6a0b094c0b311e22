"""M-step: CTF-weighted sums per (class, rotation), back-rotation, Wiener solve.

For the significant (particle i, shift t, class k, rotation r) combinations
with weights w, and with s the per-particle scale and c the CTF,

    S[k, r](f) = Σ w · s_i · c_i(f) · exp(+2πi f·t) · X_i(f)   (sparse × dense GEMM)
    Q[k, r](f) = Σ w · s_i² · c_i(f)²

in the frame of the particles; then ``num_k(g) = Σ_r S[k, r](R(ψ_r) g)`` and
``den_k(g) = Σ_r Q[k, r](R(ψ_r) g)`` in the class frame, and

    A_k = num_k / (den_k + σ² / τ²_k)

with τ²_k the class's signal power per shell (DESIGN §2).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cryo2d.em.estep import EStepResult, deshift_phases
from cryo2d.em.rotation import unrotate_sums


class PoseSums:
    """Accumulates S and Q (module docstring) over chunks of one batch.

    Parameters
    ----------
    n_classes, n_rot : int
        K and R.
    n_points : int
        Number of M-step points (full-plane points within the class radius).
    device : torch device
    """

    def __init__(self, n_classes: int, n_rot: int, n_points: int, device) -> None:
        self.K, self.R = n_classes, n_rot
        self.S = torch.zeros((n_classes * n_rot, n_points, 2), device=device)
        self.Q = torch.zeros((n_classes * n_rot, n_points), device=device)
        self.counts = torch.zeros(n_classes, device=device, dtype=torch.float64)

    def add(self, X: Tensor, ctf: Tensor, scale: Tensor, xy_cyc: Tensor, shifts_px: Tensor, res: EStepResult) -> None:
        """Add one chunk.

        Parameters
        ----------
        X : (b, m) complex tensor
            Particle transforms at the M-step points.
        ctf : (b, m) float tensor
        scale : (b,) float tensor
        xy_cyc : (m, 2) float tensor
            M-step point frequencies in cycles/px.
        shifts_px : (T, 2) float tensor
            The shift grid the E-step used.
        res : EStepResult
            Its significant combinations and weights.
        """
        b, m = X.shape
        T = shifts_px.shape[0]
        key = res.entry_i * T + res.entry_t
        uniq, inv = torch.unique(key, return_inverse=True)
        ui, ut = uniq // T, uniq % T
        phases = deshift_phases(xy_cyc, shifts_px[ut])  # (U, m)
        Yp = (X * ctf * scale[:, None])[ui] * phases
        kr = res.entry_k * self.R + res.entry_r
        W = torch.sparse_coo_tensor(
            torch.stack([kr, inv]), res.entry_w.float(), (self.K * self.R, len(uniq))
        ).coalesce()
        self.S += torch.sparse.mm(W, torch.view_as_real(Yp).reshape(len(uniq), 2 * m)).view(-1, m, 2)
        W2 = torch.sparse_coo_tensor(
            torch.stack([kr, res.entry_i]), res.entry_w.float(), (self.K * self.R, b)
        ).coalesce()
        self.Q += torch.sparse.mm(W2, ctf * ctf * (scale * scale)[:, None])
        self.counts += res.class_post.sum(dim=0).double()

    def class_frame(
        self, psi_rad: Tensor, flat: Tensor, xy: Tensor, work_box: int, zeropad: int, chunk: int = 256
    ) -> tuple[Tensor, Tensor]:
        """Back-rotate the sums and add them per class.

        Parameters
        ----------
        psi_rad : (R,) float tensor
        flat : (m,) int64 tensor
            Flat grid indices of the M-step points.
        xy : (m, 2) float tensor
            Their (x, y) frequencies in Fourier px.
        work_box : int
        zeropad : int

        Returns
        -------
        num : (K, m) complex tensor
        den : (K, m) float tensor
        """
        m = flat.numel()
        num = torch.zeros((self.K, m), dtype=torch.complex64, device=self.S.device)
        den = torch.zeros((self.K, m), device=self.S.device)
        active = torch.nonzero(self.Q.sum(dim=1) > 0).squeeze(1)
        for start in range(0, active.numel(), chunk):
            rows = active[start : start + chunk]
            c = rows.numel()
            Sg = torch.zeros((c, work_box * work_box), dtype=torch.complex64, device=num.device)
            Sg[:, flat] = torch.view_as_complex(self.S[rows].contiguous())
            Qg = torch.zeros((c, work_box * work_box), device=num.device)
            Qg[:, flat] = self.Q[rows]
            s_cls, q_cls = unrotate_sums(
                Sg.view(c, work_box, work_box), Qg.view(c, work_box, work_box), psi_rad[rows % self.R], xy, zeropad
            )
            num.index_add_(0, rows // self.R, s_cls)
            den.index_add_(0, rows // self.R, q_cls)
        return num, den


def shell_mean(values: Tensor, shell: Tensor, n_shells: int) -> Tensor:
    """Mean of ``values`` (..., m) per shell index (m,), as (..., n_shells); 0 for empty shells."""
    flat = values.reshape(-1, values.shape[-1])
    out = torch.zeros((flat.shape[0], n_shells), dtype=flat.dtype, device=flat.device)
    out.index_add_(1, shell, flat)
    cnt = torch.bincount(shell, minlength=n_shells).clamp(min=1).to(flat.dtype)
    return (out / cnt).reshape(*values.shape[:-1], n_shells)


def estimate_tau2(num: Tensor, den: Tensor, sigma2: Tensor, shell: Tensor, n_shells: int, fudge: float) -> Tensor:
    """Signal power per class and shell from the unregularised class estimate.

    τ²_k(s) = fudge · mean_s( |num/den|² − σ²/den ), the power of the
    data-only average less its noise bias, floored at a small positive value.

    Parameters
    ----------
    num : (K, m) complex, den : (K, m) float
        Class-frame sums (see module docstring).
    sigma2 : (m,) float
        Noise variance at each point.
    shell : (m,) int64
    n_shells : int
    fudge : float
        RELION's tau2_fudge.

    Returns
    -------
    (K, n_shells) float tensor
    """
    valid = den > 1e-6 * den.amax(dim=1, keepdim=True).clamp(min=1e-30)
    safe = torch.where(valid, den, torch.ones_like(den))
    power = torch.where(valid, (num.abs() / safe) ** 2 - sigma2 / safe, torch.zeros_like(den))
    tau2 = fudge * shell_mean(power, shell, n_shells)
    floor = 1e-6 * tau2.amax(dim=1, keepdim=True).clamp(min=1e-30)
    return torch.maximum(tau2, floor)


def solve_classes(num: Tensor, den: Tensor, sigma2: Tensor, tau2: Tensor, shell: Tensor) -> Tensor:
    """Wiener solution A_k = num_k / (den_k + σ²/τ²_k) at each point.

    Parameters
    ----------
    num : (K, m) complex, den : (K, m) float, sigma2 : (m,) float
    tau2 : (K, n_shells) float
    shell : (m,) int64

    Returns
    -------
    (K, m) complex tensor
    """
    return num / (den + sigma2[None] / tau2[:, shell])


def ssnr(den: Tensor, sigma2: Tensor, tau2: Tensor, shell: Tensor, n_shells: int, fudge: float) -> Tensor:
    """Spectral SNR per class and shell: (τ²/fudge) · mean_shell(den) / σ² (RELION's data_vs_prior)."""
    return (tau2 / fudge) * shell_mean(den / sigma2[None], shell, n_shells)


def resolution_shell(snr: Tensor) -> Tensor:
    """Per class, the last shell before the SSNR first drops below 1 (≥ 1).

    Parameters
    ----------
    snr : (K, n_shells) float

    Returns
    -------
    (K,) int64 tensor
    """
    below = snr[:, 1:] < 1
    first = torch.where(below.any(dim=1), below.float().argmax(dim=1), torch.full_like(below[:, 0], below.shape[1], dtype=torch.long))
    return first.clamp(min=1)

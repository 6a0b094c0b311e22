"""E-step: posteriors over (shift, class, rotation) as two matrix products.

For a chunk of b particles with Fourier coefficients X (at the E-step points),
CTF c, noise σ² and per-particle scale s, and references Z[k, r] (class k
rotated by ψ_r),

    Y[i, t]  = X_i · exp(+2πi f·t_t) · c_i · w / σ²          (de-shifted data)
    C        = Re⟨Y[i, t], Z[k, r]⟩   one GEMM (b·T × 2M)(2M × K·R)
    N[i, kr] = ⟨c_i² · w / σ², |Z[k, r]|²⟩   one GEMM (b × M)(M × K·R)
    log p    = (s·C − s²·N / 2) / temperature + log π_k

where w = 2 for half-plane points (each stands for a Hermitian pair). The
data model is X = s · c · shift_t(rotate_ψ(A_k)) + noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EStepResult:
    """Per-particle outcome of the E-step for one chunk (b particles).

    Attributes
    ----------
    class_post : (b, K) float
        Posterior probability of each class (marginal over poses).
    best_t, best_k, best_r : (b,) int64
        Indices of the most probable (shift, class, rotation).
    max_prob : (b,) float
        Posterior of that (shift, class, rotation).
    best_cross, best_norm : (b,) float
        C and N at the best pose (for scale estimation), unscaled.
    entry_i, entry_t, entry_k, entry_r : (e,) int64
        The significant (particle, shift, class, rotation) combinations that
        the M-step uses...
    entry_w : (e,) float
        ...and their weights; per particle they sum to 1.
    log_evidence : (b,) float
        log Σ exp(log p) over all poses (up to a per-particle constant).
    """

    class_post: Tensor
    best_t: Tensor
    best_k: Tensor
    best_r: Tensor
    max_prob: Tensor
    best_cross: Tensor
    best_norm: Tensor
    entry_i: Tensor
    entry_t: Tensor
    entry_k: Tensor
    entry_r: Tensor
    entry_w: Tensor
    log_evidence: Tensor


def deshift_phases(xy: Tensor, shifts_px: Tensor) -> Tensor:
    """exp(+2πi f·t / box) for each shift t and frequency f.

    Parameters
    ----------
    xy : (m, 2) float tensor
        Frequencies in Fourier px of a ``box`` grid, already divided by box
        (i.e. cycles/px).
    shifts_px : (T, 2) float tensor
        Shifts (x, y) in px.

    Returns
    -------
    (T, m) complex tensor: multiplying a transform by row t shifts the image by −t.
    """
    phase = 2 * torch.pi * (shifts_px.double() @ xy.double().T)
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)


def e_step(
    X: Tensor,
    ctf: Tensor,
    inv_sigma2: Tensor,
    refs: Tensor,
    phases: Tensor,
    log_prior: Tensor,
    scale: Tensor,
    *,
    temperature: float = 1.0,
    mode: str = "soft",
    max_entries: int = 48,
    min_weight: float = 5e-3,
) -> EStepResult:
    """Posteriors of one chunk of particles over all (shift, class, rotation).

    Parameters
    ----------
    X : (b, M) complex tensor
        Particle transforms at the E-step points.
    ctf : (b, M) float tensor
        CTF at those points (ones without CTF).
    inv_sigma2 : (M,) float tensor
        Point weight / noise variance (w / σ²).
    refs : (K, R, M) complex tensor
        Rotated class transforms at the E-step points.
    phases : (T, M) complex tensor
        De-shift phases from :func:`deshift_phases`.
    log_prior : (K,) float tensor
        Log class priors.
    scale : (b,) float tensor
        Per-particle scale factors.
    temperature : float
        Noise-annealing factor (≥ 1): log-likelihoods are divided by it.
    mode : {"soft", "hard", "hard_class"}
        "soft": keep the significant poses over all classes; "hard": only the
        best (shift, class, rotation); "hard_class": only poses within the
        best class (renormalised).
    max_entries : int
        At most this many combinations per particle are kept (soft modes).
    min_weight : float
        Combinations below ``min_weight × best`` are dropped (soft modes).

    Returns
    -------
    EStepResult
    """
    b, m = X.shape
    K, R, _ = refs.shape
    T = phases.shape[0]
    KR = K * R
    Y = (X * ctf * inv_sigma2).unsqueeze(1) * phases.unsqueeze(0)  # (b, T, M)
    Yr = torch.view_as_real(Y).reshape(b * T, 2 * m)
    Zr = torch.view_as_real(refs.reshape(KR, m).contiguous()).reshape(KR, 2 * m)
    cross = (Yr @ Zr.T).view(b, T, KR)
    norm = ((ctf * ctf) * inv_sigma2) @ (refs.reshape(KR, m).abs() ** 2).T  # (b, KR)
    s = scale.view(b, 1, 1)
    logp = (s * cross - 0.5 * s * s * norm.unsqueeze(1)) / temperature
    logp = logp.view(b, T, K, R) + log_prior.view(1, 1, K, 1)
    flat = logp.view(b, -1)
    peak = flat.amax(dim=1, keepdim=True)
    post = flat.sub_(peak).exp_()
    total = post.sum(dim=1, keepdim=True)
    post.div_(total)
    log_evidence = (peak + torch.log(total)).squeeze(1)
    max_prob, best = post.max(dim=1)
    best_t = best // KR
    best_kr = best % KR
    best_k, best_r = best_kr // R, best_kr % R
    class_post = post.view(b, T, K, R).sum(dim=(1, 3))
    rows = torch.arange(b, device=X.device)
    best_cross = cross[rows, best_t, best_kr]
    best_norm = norm[rows, best_kr]

    if mode == "hard":
        e_i, e_t, e_k, e_r = rows, best_t, best_k, best_r
        e_w = torch.ones(b, dtype=post.dtype, device=X.device)
    else:
        if mode == "hard_class":
            keep_class = class_post.argmax(dim=1)
            sel = torch.zeros(b, 1, K, 1, dtype=torch.bool, device=X.device)
            sel[rows, 0, keep_class, 0] = True
            post = torch.where(sel, post.view(b, T, K, R), 0.0).view(b, -1)
            post = post / post.sum(dim=1, keepdim=True)
        n_keep = min(max_entries, post.shape[1])
        w, idx = torch.topk(post, n_keep, dim=1)
        keep = w >= min_weight * w[:, :1]
        w = torch.where(keep, w, 0.0)
        w = w / w.sum(dim=1, keepdim=True)
        e_i = rows[:, None].expand(b, n_keep)[keep]
        idx = idx[keep]
        e_w = w[keep]
        e_t = idx // KR
        e_k = (idx % KR) // R
        e_r = idx % R
    return EStepResult(
        class_post=class_post,
        best_t=best_t,
        best_k=best_k,
        best_r=best_r,
        max_prob=max_prob,
        best_cross=best_cross,
        best_norm=best_norm,
        entry_i=e_i,
        entry_t=e_t,
        entry_k=e_k,
        entry_r=e_r,
        entry_w=e_w,
        log_evidence=log_evidence,
    )

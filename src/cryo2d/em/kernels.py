"""Fused CPU kernels (Numba) for the memory-bound steps of a pass.

On a 2-core CPU three steps of a pass took their time in trips through
memory, not in arithmetic, as torch operations (ribosome 80 px, K = 24:
0.81 of a 1.65 s online pass; benchmarks/README.md, session 24):

- :func:`fine_cross`, the fine stage of
  :func:`cryo2d.em.estep.e_step_coarse_to_fine`: each candidate (class,
  rotation) scored at its 3 fine rotations × the offsets around its coarse
  shift. In torch: a gather of the candidates' reference rows, a product with
  the de-shifted particle, a GEMM against the offsets' phases. Here each
  point is read once for the 3 rotations, and the offsets' phases factor
  into one x and one y step (13 multiply-adds a point and rotation for the
  9 offsets; session 27).
- :func:`best_pose_residual`, the noise model's input: each particle's
  residual at its best pose, whitened and per shell, with the class sampled
  as :func:`cryo2d.em.rotation.sample_half` samples it.
- :func:`scatter_sums`, the M-step's sums per (class, rotation)
  (:class:`cryo2d.em.mstep.PoseSums`): each entry added where it goes,
  rather than two sparse products of the de-shifted images.
- :func:`hard_poses`, hard mode's summary of the fine stage's poses: each
  pose's log-probability, the best pose, the class posteriors, without the
  (b, poses) tables torch makes for them (session 25).
- :func:`pose_logp` and :func:`class_sums`, the same poses' log-probabilities
  and their class sums for the soft summary, which torch finishes, and
  :func:`coarse_max`, each coarse (class, rotation)'s best coarse shift and
  its score (sessions 26-27), and :func:`coarse_max_pairs` the same from the
  float32 products of half-turn pairs, whose images :func:`coarse_images_split`
  makes (session 47), or from the int8 products whose images :func:`coarse_images8`
  makes and quantises (session 48); :func:`coarse_images`, the coarse stage's
  de-shifted images made and rounded to bfloat16 in one pass, and
  :func:`turn_rows`, the M-step's rows a quarter turn apart turned and added
  onto one (session 30); :func:`grow_regions`, the auto mask's regions that
  reach half their class's peak, by flood fill (session 31).

Their sums run in another order than torch's, so results agree with the
torch code (kept for ``--device cuda``) to float32 rounding, not bit for bit
(:func:`hard_poses` scores the poses as torch does and picks torch's best;
:func:`pose_logp`, :func:`class_sums`, :func:`coarse_max`, :func:`coarse_images` and :func:`turn_rows`
give torch's bits; :func:`grow_regions` gives the masks of the torch steps exactly).

The kernels compile on first use (a few seconds; cached on disk where the
package folder or a user cache folder can be written). They are serial code
that releases the GIL, run on as many threads as torch uses (:func:`_split`:
each thread takes a contiguous share of the particles, or of the rows), so
a result does not depend on the number of threads, nor on whether the code
was compiled in this process or loaded from the cache. Where Numba cannot be
imported, :func:`available` is False and the callers use their torch code.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

try:
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; torch code stands in without it
    numba = None

_POOL = None  # (threads, pid, ThreadPoolExecutor)


def available(device) -> bool:
    """Whether the fused kernels can run for tensors on ``device`` (a CPU, with Numba)."""
    return numba is not None and torch.device(device).type == "cpu"


def _jit(fn=None, *, fastmath: bool = True):
    """``fn`` compiled without the GIL, cached on disk where a cache folder can be written.

    Serial code on threads of :func:`_split`, not Numba's ``parallel=True``: parallel
    code loaded from the disk cache is optimised differently from freshly compiled
    code (numba/numba#10617), and with ``fastmath`` its sums then round differently,
    so a job's first run after installing gave other numbers than its later runs
    (`peer`: junk F1 0.663 against 0.668). Serial code gives the same bits either way.
    """
    if fn is None:  # @_jit(fastmath=False)
        return lambda f: _jit(f, fastmath=fastmath)
    try:
        return njit(fastmath=fastmath, nogil=True, cache=True)(fn)
    except RuntimeError:  # no writable cache location (Numba raises when caching is asked for)
        return njit(fastmath=fastmath, nogil=True)(fn)


if numba is not None:
    @_jit
    def _fine_cross(lo, hi, P, phases, table, rows, t_first, skip, u_re, u_im, w_re, w_im, out):  # pragma: no cover - compiled
        nc = t_first.shape[1]
        m = P.shape[1]
        q_re = np.empty(m, dtype=np.float32)
        q_im = np.empty(m, dtype=np.float32)
        zero = np.float32(0.0)
        for i in range(lo, hi):
            for cand in range(nc):
                if skip[i, cand]:
                    continue
                t = t_first[i, cand]
                for f in range(m):  # P · e(t_c)
                    w = P[i, f] * phases[t, f]
                    q_re[f] = w.real
                    q_im[f] = w.imag
                row0, row1, row2 = rows[i, cand, 0], rows[i, cand, 1], rows[i, cand, 2]
                # The three rotations in one loop, so that each point's values are read once.
                a = (zero, zero, zero, zero, zero, zero, zero, zero, zero)
                b = c = a
                for f in range(m):
                    qr, qi = q_re[f], q_im[f]
                    ur, ui, wr, wi = u_re[f], u_im[f], w_re[f], w_im[f]
                    a = _fine_point(table[row0, f], qr, qi, ur, ui, wr, wi, a)
                    b = _fine_point(table[row1, f], qr, qi, ur, ui, wr, wi, b)
                    c = _fine_point(table[row2, f], qr, qi, ur, ui, wr, wi, c)
                _fine_sums(a, out[i, cand, 0])
                _fine_sums(b, out[i, cand, 1])
                _fine_sums(c, out[i, cand, 2])

    @_jit
    def _fine_point(z, qr, qi, ur, ui, wr, wi, acc):  # pragma: no cover - compiled
        """One point's terms of the nine sums of :func:`_fine_sums` added to ``acc``: Y = conj(z)·q, then
        Σ Y_re, Σ Y_re·u_re, Σ Y_im·u_im and, with x = Y_re·w_re, y = Y_im·w_im, s = Y_re·w_im,
        v = Y_im·w_re: Σ x, Σ y, Σ x·u_re, Σ y·u_re, Σ s·u_im, Σ v·u_im."""
        yr = z.real * qr + z.imag * qi
        yi = z.real * qi - z.imag * qr
        x, y, s, v = yr * wr, yi * wi, yr * wi, yi * wr
        return (acc[0] + yr, acc[1] + yr * ur, acc[2] + yi * ui, acc[3] + x, acc[4] + y, acc[5] + x * ur,
                acc[6] + y * ur, acc[7] + s * ui, acc[8] + v * ui)

    @_jit
    def _fine_sums(acc, o):  # pragma: no cover - compiled
        """The 3 × 3 offsets' Re Σ Y·u^dx·w^dy (x fastest) from the nine sums of :func:`_fine_point`."""
        t1, t2, t3, s1, s2, s3, s4, s5, s6 = acc
        o[0] = s3 + s4 + s6 - s5  # (dx, dy) = (-1, -1): Re(Y·conj(w)·conj(u))
        o[1] = s1 + s2  # (0, -1)
        o[2] = s3 + s4 - s6 + s5  # (1, -1)
        o[3] = t2 + t3  # (-1, 0)
        o[4] = t1  # (0, 0)
        o[5] = t2 - t3  # (1, 0)
        o[6] = s3 - s4 + s5 + s6  # (-1, 1)
        o[7] = s1 - s2  # (0, 1)
        o[8] = s3 - s4 - s5 - s6  # (1, 1)

    @_jit
    def _best_pose_residual(lo, hi, G, k_idx, psi, t_idx, scale, X, C, phases, xy, zeropad, w_sig, shell, chi2,
                            per_shell):  # pragma: no cover - compiled
        m = X.shape[1]
        p, w = G.shape[1], G.shape[2]
        half = p // 2
        for i in range(lo, hi):
            k, t, sc = k_idx[i], t_idx[i], scale[i]
            cs, sn = np.cos(-psi[i]), np.sin(-psi[i])
            acc = 0.0
            for j in range(m):
                x, y = xy[j, 0], xy[j, 1]
                u = cs * x - sn * y  # the point rotated by -psi (rotation.rotated_points)
                v = sn * x + cs * y
                flip = u < 0
                if flip:  # x < 0: sampled at -f and conjugated (rotation.sample_half)
                    u, v = -u, -v
                fx = u * zeropad
                fy = v * zeropad + half
                x0 = int(np.floor(fx))
                y0 = int(np.floor(fy))
                ax = fx - x0
                ay = fy - y0
                val = 0j
                for dy in range(2):
                    yy = y0 + dy
                    if yy < 0 or yy >= p:
                        continue
                    wy = ay if dy else 1.0 - ay
                    for dx in range(2):
                        xx = x0 + dx
                        if xx < 0 or xx >= w:
                            continue
                        val += (wy * (ax if dx else 1.0 - ax)) * G[k, yy, xx]
                if flip:
                    val = val.conjugate()
                r = X[i, j] * phases[t, j] - sc * C[i, j] * val
                q = r.real * r.real + r.imag * r.imag
                acc += q * w_sig[j]
                per_shell[i, shell[j]] += q
            chi2[i] = acc

    @_jit
    def _scatter_sums(lo, hi, order, starts, room, e_i, e_t, e_w, X, C, scale, phases, S, Q):  # pragma: no cover - compiled
        m = X.shape[1]
        for u in range(lo, hi):  # rooms lo..hi-1: no two threads write one row
            for j in range(starts[u], starts[u + 1]):
                e = order[j]
                i, t, ro = e_i[e], e_t[e], room[e]
                ws = e_w[e] * scale[i]
                ws2 = ws * scale[i]
                for f in range(m):
                    c = C[i, f]
                    S[ro, f] += (ws * c) * (X[i, f] * phases[t, f])
                    Q[ro, f] += ws2 * c * c

    @_jit(fastmath=False)
    def _score_poses(i, cross, norm3, t_c, kr_c, skip, rep_row, rep, scale, log_prior, temperature, R, null_c,
                     null_logp, out):  # pragma: no cover - compiled
        """Particle i's pose log-probabilities into ``out`` (nc · 3 · n_off), as torch scores them."""
        nc, n_off = t_c.shape[1], t_c.shape[2]
        inf = np.float32(np.inf)
        s = scale[i]
        h = np.float32(0.5) * (s * s)
        rr = rep_row[i]
        for c in range(nc):
            for r in range(3):
                base = (c * 3 + r) * n_off
                if c == null_c:  # one pose: the centre
                    for o in range(n_off):
                        out[base + o] = -inf
                    if r == 1:
                        out[base + n_off // 2] = null_logp
                    continue
                if skip[i, c]:
                    for o in range(n_off):
                        out[base + o] = -inf
                    continue
                lp = log_prior[kr_c[i, c, r] // R]
                hn = h * norm3[i, c, r]
                for o in range(n_off):
                    v = (s * cross[i, c, r, o] - hn) / temperature + lp
                    out[base + o] = v if t_c[i, c, o] >= 0 else -inf
                if rr >= 0:
                    for o in range(n_off):
                        if rep[rr, base + o]:
                            out[base + o] = -inf

    @_jit(fastmath=False)
    def _hard_poses(lo, hi, cross, norm3, t_c, kr_c, skip, rep_row, rep, scale, log_prior, temperature, R, null_c,
                    null_logp, floor, best, max_prob, log_ev, class_post):  # pragma: no cover - compiled
        nc, n_off = t_c.shape[1], t_c.shape[2]
        logp = np.empty(nc * 3 * n_off, dtype=np.float32)
        cls = np.empty(class_post.shape[1], dtype=np.float64)
        for i in range(lo, hi):
            _score_poses(i, cross, norm3, t_c, kr_c, skip, rep_row, rep, scale, log_prior, temperature, R, null_c,
                         null_logp, logp)
            peak = -np.float32(np.inf)
            arg = 0
            for j in range(logp.shape[0]):
                if logp[j] > peak:
                    peak = logp[j]
                    arg = j
            total = 0.0
            cls[:] = 0.0
            for c in range(nc):
                for r in range(3):
                    k = kr_c[i, c, r] // R
                    base = (c * 3 + r) * n_off
                    for o in range(n_off):
                        d = logp[base + o] - peak
                        if d >= floor:
                            w = np.exp(d)
                            total += w
                            cls[k] += w
            for k in range(cls.shape[0]):
                class_post[i, k] = cls[k] / total
            best[i] = arg
            max_prob[i] = np.float32(1.0) / np.float32(total)
            log_ev[i] = peak + np.float32(np.log(total))

    @_jit(fastmath=False)
    def _pose_logp(lo, hi, cross, norm3, t_c, kr_c, skip, rep_row, rep, scale, log_prior, temperature, R, null_c,
                   null_logp, logp):  # pragma: no cover - compiled
        for i in range(lo, hi):
            _score_poses(i, cross, norm3, t_c, kr_c, skip, rep_row, rep, scale, log_prior, temperature, R, null_c,
                         null_logp, logp[i])

    @_jit(fastmath=False)
    def _turn_rows(lo, hi, starts, rooms, turn, S, Q, src, sign, out_S, out_Q):  # pragma: no cover - compiled
        m = S.shape[1]
        for u in range(lo, hi):  # targets lo..hi-1, their rows in order of turns
            for e in range(starts[u], starts[u + 1]):
                ro, t = rooms[e], turn[e]
                for f in range(m):
                    g = src[t, f]
                    out_S[u, f, 0] += S[ro, g, 0]
                    out_S[u, f, 1] += S[ro, g, 1] * sign[t, f]
                    out_Q[u, f] += Q[ro, g]

    @_jit(fastmath=False)
    def _coarse_images16(lo, hi, P, phases, out):  # pragma: no cover - compiled
        Tc, Mc = phases.shape
        row = np.empty(2 * Mc, dtype=np.float32)
        bits = row.view(np.uint32)
        for i in range(lo, hi):
            for t in range(Tc):
                for j in range(Mc):  # the product as torch's complex multiply makes it (no fused multiply-add)
                    p, e = P[i, j], phases[t, j]
                    row[2 * j] = p.real * e.real - p.imag * e.imag
                    row[2 * j + 1] = p.real * e.imag + p.imag * e.real
                o = out[i * Tc + t]
                for j in range(2 * Mc):  # to bfloat16, rounded to nearest even (finite values), as torch rounds
                    u = bits[j]
                    o[j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @_jit(fastmath=False)
    def _coarse_images_split(lo, hi, P, phases, out):  # pragma: no cover - compiled
        Tc, Mc = phases.shape
        for i in range(lo, hi):
            for t in range(Tc):
                o = out[i * Tc + t]
                for j in range(Mc):  # real parts, then imaginary parts
                    p, e = P[i, j], phases[t, j]
                    o[j] = p.real * e.real - p.imag * e.imag
                    o[Mc + j] = p.real * e.imag + p.imag * e.real

    @_jit(fastmath=False)
    def _coarse_images8(lo, hi, P, phases, balance, out, scale):  # pragma: no cover - compiled
        Tc, Mc = phases.shape
        for i in range(lo, hi):
            top = np.float32(0.0)  # the largest |P·a|: no de-shifted part can exceed it
            for j in range(Mc):
                a = np.float32(abs(P[i, j])) * balance[j]
                if a > top:
                    top = a
            s = np.float32(127.0) / top if top > 0 else np.float32(0.0)
            scale[i] = top / np.float32(127.0)
            for t in range(Tc):
                o = out[i * Tc + t]
                for j in range(Mc):  # real parts, then imaginary parts
                    p, e = P[i, j], phases[t, j]
                    f = balance[j] * s
                    o[j] = np.int8(np.rint((p.real * e.real - p.imag * e.imag) * f))
                    o[Mc + j] = np.int8(np.rint((p.real * e.imag + p.imag * e.real) * f))

    @_jit
    def _coarse_max16(lo, hi, scores, best, arg):  # pragma: no cover - compiled
        Tc, n = scores.shape[1], scores.shape[2]
        key = np.empty(n, dtype=np.int32)
        at = np.empty(n, dtype=np.int32)
        for i in range(lo, hi):
            key[:] = -65536  # below every value's key: the first row is always taken
            at[:] = 0
            for t in range(Tc):  # row by row: the columns are contiguous
                for j in range(n):
                    u = np.int32(scores[i, t, j])
                    kk = u if u >= 0 else -(u & 0x7FFF)  # bfloat16 bits -> an integer in the values' order
                    if kk > key[j]:
                        key[j] = kk
                        at[j] = t
            for j in range(n):  # float32 bits of the best row's bfloat16
                arg[i, j] = at[j]
                best[i, j] = np.int32(np.uint16(scores[i, at[j], j])) << 16

    @_jit(fastmath=False)
    def _coarse_max_pairs(lo, hi, re, im, best, arg):  # pragma: no cover - compiled
        Tc, K, h = re.shape[1], re.shape[2], re.shape[3]
        n = K * h
        top_p = np.empty(n, dtype=best.dtype)  # float32, or int32 for the int8 products
        top_m = np.empty(n, dtype=best.dtype)
        at_p = np.empty(n, dtype=np.int64)
        at_m = np.empty(n, dtype=np.int64)
        for i in range(lo, hi):
            for t in range(Tc):  # row by row: the columns are contiguous
                a, c = re[i, t].ravel(), im[i, t].ravel()
                for j in range(n):
                    p = a[j] + c[j]
                    m = a[j] - c[j]
                    if t == 0 or p > top_p[j]:
                        top_p[j] = p
                        at_p[j] = t
                    if t == 0 or m > top_m[j]:
                        top_m[j] = m
                        at_m[j] = t
            for k in range(K):  # class k's columns: its rotations r, then their half turns r + h
                for r in range(h):
                    best[i, k, r], arg[i, k, r] = top_p[k * h + r], at_p[k * h + r]
                    best[i, k, h + r], arg[i, k, h + r] = top_m[k * h + r], at_m[k * h + r]

    @_jit(fastmath=False)
    def _class_sums(lo, hi, post, kr_c, R, n_off, out):  # pragma: no cover - compiled
        nc = kr_c.shape[1]
        for i in range(lo, hi):
            for c in range(nc):
                for r in range(3):
                    k = kr_c[i, c, r] // R
                    base = (c * 3 + r) * n_off
                    acc = out[i, k]
                    for o in range(n_off):
                        acc += post[i, base + o]
                    out[i, k] = acc

    @_jit(fastmath=False)
    def _grow_regions(lo, hi, support, seed, out):  # pragma: no cover - compiled
        b, w = support.shape[1], support.shape[2]
        stack = np.empty(b * w, dtype=np.int64)  # each pixel is pushed at most once
        for k in range(lo, hi):
            top = 0
            for y in range(b):
                for x in range(w):
                    if seed[k, y, x] and support[k, y, x] and not out[k, y, x]:
                        out[k, y, x] = True
                        stack[top] = y * w + x
                        top += 1
            while top > 0:  # depth-first flood fill over the 8 neighbours within the support
                top -= 1
                y, x = stack[top] // w, stack[top] % w
                for yy in range(max(y - 1, 0), min(y + 2, b)):
                    for xx in range(max(x - 1, 0), min(x + 2, w)):
                        if support[k, yy, xx] and not out[k, yy, xx]:
                            out[k, yy, xx] = True
                            stack[top] = yy * w + xx
                            top += 1


def _starts(counts: Tensor) -> Tensor:
    """(n + 1,) int64 offsets of n consecutive groups of ``counts`` (n,) items: group j is items starts[j] … starts[j + 1] − 1."""
    starts = torch.zeros(len(counts) + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=starts[1:])
    return starts


def _np(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().numpy())


def _pool(n: int) -> ThreadPoolExecutor:
    """A pool of ``n`` threads, made once (again after a fork, whose child has no threads)."""
    global _POOL
    if _POOL is None or _POOL[0] != n or _POOL[1] != os.getpid():
        _POOL = (n, os.getpid(), ThreadPoolExecutor(max_workers=n, thread_name_prefix="cryo2d-kernel"))
    return _POOL[2]


def _split(kernel, work: np.ndarray, args: tuple) -> None:
    """Run ``kernel(lo, hi, *args)`` over items 0 … len(work)-1 in as many parts as torch has threads.

    ``work`` (n,) is each item's cost: the parts hold about equal shares of
    it. Each item is computed whole by one thread, so the results do not
    depend on the number of threads.
    """
    n = len(work)
    threads = max(1, min(torch.get_num_threads(), n))
    if threads == 1:
        kernel(0, n, *args)
        return
    total = np.cumsum(work, dtype=np.float64)
    cuts = np.searchsorted(total, total[-1] * np.arange(1, threads) / threads)
    bounds = np.concatenate([[0], np.clip(cuts, 0, n), [n]]).astype(np.int64)
    jobs = [_pool(threads).submit(kernel, int(lo), int(hi), *args) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    for job in jobs:
        job.result()


def fine_cross(P: Tensor, phases: Tensor, table: Tensor, rows: Tensor, t_first: Tensor, skip: Tensor,
               offsets: Tensor) -> Tensor:
    """Correlations of each candidate's fine poses: the fine stage's sums in one pass.

    ``cross[i, c, j, d] = Re Σ_f P[i, f] · e(t_first[i, c])[f] · e(d)[f] · conj(table[rows[i, c, j], f])``,
    with ``e(t) = phases[t]``: particle i's weighted data de-shifted by its
    candidate's coarse shift and then by offset d, against the reference row
    of the candidate's rotation j (of 3).

    The offsets are the 3 × 3 lattice (dx, dy) ∈ {−1, 0, 1}² of one fine
    step (x fastest, ``estep.SHIFT_REACH`` = 1), whose phases factor:
    e(dx, dy) = u^dx · w^dy with u = e(1, 0) = ``offsets[5]``, w = e(0, 1) =
    ``offsets[7]`` (the only rows read). So the nine sums of each rotation
    come from nine sums of products of Y = conj(Z)·P·e(t) with u and w
    (:func:`_fine_sums`): 13 multiply-adds a point instead of 18, the three
    rotations in one loop (ribosome 80 px, K = 24: a chunk of 255 particles
    alone 26 -> 13 ms, a pass of 2,400 in place 0.33 -> 0.21 s). The sums
    agree with the direct ones to float32 rounding.

    Parameters
    ----------
    P : (b, M) complex64 tensor
        The particles' data × CTF × w / σ² at the E-step points.
    phases : (T, M) complex64 tensor
        De-shift phases of the fine shifts.
    table : (n_rows, M) complex64 tensor
        Reference rows (rotated classes at the E-step points).
    rows : (b, nc, 3) int64 tensor
        Each candidate's rows of ``table`` at its 3 fine rotations.
    t_first : (b, nc) int64 tensor
        Each candidate's coarse shift (row of ``phases``).
    skip : (b, nc) bool tensor
        Candidates not scored (their correlations are 0).
    offsets : (9, M) complex64 tensor
        The offsets' phases e(d), in the lattice's order.

    Returns
    -------
    (b, nc, 3, 9) float32 tensor
    """
    if offsets.shape[0] != 9:
        raise ValueError(f"fine_cross needs the 3 x 3 offsets of one fine step, got {offsets.shape[0]}")
    b, nc = t_first.shape
    out = np.zeros((b, nc, 3, 9), dtype=np.float32)
    skip_np = _np(skip.bool())
    u, w = offsets[5], offsets[7]
    args = (_np(P), _np(phases), _np(table), _np(rows.long()), _np(t_first.long()), skip_np,
            _np(u.real), _np(u.imag), _np(w.real), _np(w.imag), out)
    _split(_fine_cross, 1 + nc - skip_np.sum(axis=1), args)
    return torch.from_numpy(out)


def best_pose_residual(G: Tensor, k_idx: Tensor, psi_rad: Tensor, t_idx: Tensor, scale: Tensor, X: Tensor, C: Tensor,
                       phases: Tensor, xy: Tensor, zeropad: int, w_sig: Tensor, shell: Tensor,
                       n_shells: int) -> tuple[Tensor, Tensor]:
    """Each particle's residual power at its best pose: whitened total and per shell, in one pass.

    The residual is ``X · e(t) − s · C · A_k(R(−ψ) f)`` at each point f, with
    the class transform sampled bilinearly on its oversampled half-plane
    grid as :func:`cryo2d.em.rotation.sample_half` samples it.

    Parameters
    ----------
    G : (K, p, p//2 + 1) complex64 tensor
        Oversampled half-plane class transforms (:func:`~cryo2d.em.rotation.oversample`, as complex).
    k_idx, t_idx : (b,) int64 tensors
        Best class and shift (row of ``phases``) of each particle.
    psi_rad, scale : (b,) float32 tensors
        Best in-plane angle (radians) and scale of each particle.
    X, C : (b, M) complex64 / float32 tensors
        Data and CTF at the points.
    phases : (T, M) complex64 tensor
        De-shift phases.
    xy : (M, 2) float32 tensor
        The points, Fourier px of the working box.
    zeropad : int
    w_sig : (M,) float32 tensor
        Point weight / σ² of its shell.
    shell : (M,) int64 tensor
        Shell of each point, < ``n_shells``.

    Returns
    -------
    chi2 : (b,) float32 tensor
        Σ_f w/σ² · |residual|².
    per_shell : (b, n_shells) float64 tensor
        Σ over each shell's points of |residual|².
    """
    b = X.shape[0]
    chi2 = np.zeros(b, dtype=np.float64)
    per_shell = np.zeros((b, n_shells), dtype=np.float64)
    args = (_np(G), _np(k_idx.long()), _np(psi_rad.float()), _np(t_idx.long()), _np(scale.float()), _np(X),
            _np(C.float()), _np(phases), _np(xy.float()), int(zeropad), _np(w_sig.float()), _np(shell.long()), chi2,
            per_shell)
    _split(_best_pose_residual, np.ones(b), args)
    return torch.from_numpy(chi2).float(), torch.from_numpy(per_shell)


def scatter_sums(S: Tensor, Q: Tensor, room: Tensor, e_i: Tensor, e_t: Tensor, e_w: Tensor, X: Tensor, C: Tensor,
                 scale: Tensor, phases: Tensor) -> None:
    """Add entries to per-(class, rotation) sums in place: the M-step's scatter-add in one pass.

    For each entry e: ``S[room_e] += w_e · s_i · C_i · X_i · e(t_e)`` and
    ``Q[room_e] += w_e · s_i² · C_i²`` (i = ``e_i[e]``; :class:`cryo2d.em.mstep.PoseSums`).
    The entries of one room are added in their order.

    Parameters
    ----------
    S : (rooms, M) complex64 tensor, Q : (rooms, M) float32 tensor
        The sums (contiguous; changed in place).
    room, e_i, e_t : (n_e,) int64 tensors
        Each entry's room, particle (row of ``X``) and shift (row of ``phases``).
    e_w : (n_e,) float32 tensor
        Weights.
    X : (b, M) complex64, C : (b, M) float32, scale : (b,) float32, phases : (T, M) complex64 tensors
    """
    order = torch.argsort(room, stable=True)
    _, counts = torch.unique_consecutive(room[order], return_counts=True)
    starts = _starts(counts)
    args = (_np(order), _np(starts), _np(room.long()), _np(e_i.long()), _np(e_t.long()), _np(e_w.float()), _np(X),
            _np(C.float()), _np(scale.float()), _np(phases), S.numpy(), Q.numpy())
    _split(_scatter_sums, counts.numpy(), args)


def _scoring_inputs(cross: Tensor, norm3: Tensor, t_c: Tensor, kr_c: Tensor, skip: Tensor, repeat_rows: Tensor,
                    repeat: Tensor, scale: Tensor, log_prior: Tensor, temperature: float, R: int, null_class: int,
                    null_logp: float) -> tuple:
    """The arguments of ``_score_poses`` after the particle, as the kernels take them (:func:`hard_poses`)."""
    return (_np(cross.float()), _np(norm3.float()), _np(t_c.long()), _np(kr_c.long()), _np(skip.bool()),
            _np(repeat_rows.long()), _np(repeat.bool()), _np(scale.float()), _np(log_prior.float()),
            np.float32(temperature), int(R), int(null_class), np.float32(null_logp))


def hard_poses(cross: Tensor, norm3: Tensor, t_c: Tensor, kr_c: Tensor, skip: Tensor, repeat_rows: Tensor,
               repeat: Tensor, scale: Tensor, log_prior: Tensor, temperature: float, R: int, n_classes: int,
               null_class: int, null_logp: float, floor: float) -> tuple[Tensor, ...]:
    """The hard-mode summary of the fine stage's poses in one pass: each particle's best pose and posteriors.

    Pose (c, j, d) of particle i (candidate c, fine rotation j of 3, offset
    d) has log-probability ``(s·cross − s²·norm3/2) / temperature +
    log_prior[class]``, as :func:`cryo2d.em.estep.e_step_coarse_to_fine`
    scores it, or −∞ where its candidate is skipped, its shift lies outside
    the disc (``t_c < 0``) or it repeats another pose of the particle (row
    ``repeat_rows[i]`` of ``repeat``, −1: none). Candidate ``null_class``
    (the empty-box class; −1: none) has one pose, its centre, at ``null_logp``.
    Posteriors are ``exp(logp − max)`` normalised, 0 below ``floor`` nats.
    Computed without fast-math, in float32 as torch computes them, so the
    best pose is torch's.

    Parameters
    ----------
    cross : (b, nc, 3, n_off) float32 tensor
    norm3 : (b, nc, 3) float32 tensor
    t_c : (b, nc, n_off) int64 tensor
        Each pose's fine shift (−1: outside the disc).
    kr_c : (b, nc, 3) int64 tensor
        Each candidate rotation's class · R + rotation.
    skip : (b, nc) bool tensor
    repeat_rows : (b,) int64 tensor; repeat : (n, nc · 3 · n_off) bool tensor
    scale : (b,) float32 tensor; log_prior : (K,) float32 tensor

    Returns
    -------
    best : (b,) int64 tensor
        Flat index of the best pose in (nc, 3, n_off).
    max_prob, log_evidence : (b,) float32 tensors
    class_post : (b, K) float32 tensor
    """
    b = t_c.shape[0]
    best = np.zeros(b, dtype=np.int64)
    max_prob = np.zeros(b, dtype=np.float32)
    log_ev = np.zeros(b, dtype=np.float32)
    class_post = np.zeros((b, n_classes), dtype=np.float32)
    args = _scoring_inputs(cross, norm3, t_c, kr_c, skip, repeat_rows, repeat, scale, log_prior, temperature, R,
                           null_class, null_logp)
    _split(_hard_poses, np.ones(b), (*args, np.float32(floor), best, max_prob, log_ev, class_post))
    return (torch.from_numpy(best), torch.from_numpy(max_prob), torch.from_numpy(log_ev),
            torch.from_numpy(class_post))


def pose_logp(cross: Tensor, norm3: Tensor, t_c: Tensor, kr_c: Tensor, skip: Tensor, repeat_rows: Tensor,
              repeat: Tensor, scale: Tensor, log_prior: Tensor, temperature: float, R: int, null_class: int,
              null_logp: float) -> Tensor:
    """Log-probabilities (b, nc · 3 · n_off) of the fine stage's poses, as :func:`hard_poses` scores them.

    The same float32 operations, in the same order, as the torch code of
    :func:`cryo2d.em.estep._summarise_poses`, so the values are the same bits:
    −∞ where the candidate is skipped, the shift lies outside the disc or the
    pose repeats an earlier one (row ``repeat_rows[i]`` of ``repeat``); the
    empty-box candidate ``null_class`` has its centre only, at ``null_logp``.
    Arguments as :func:`hard_poses`.
    """
    b, nc, _, n_off = cross.shape
    logp = np.empty((b, nc * 3 * n_off), dtype=np.float32)
    args = _scoring_inputs(cross, norm3, t_c, kr_c, skip, repeat_rows, repeat, scale, log_prior, temperature, R,
                           null_class, null_logp)
    _split(_pose_logp, np.ones(b), (*args, logp))
    return torch.from_numpy(logp)


def class_sums(post: Tensor, kr_c: Tensor, R: int, n_classes: int) -> Tensor:
    """(b, K) sums of the poses' posteriors ``post`` (b, nc · 3 · n_off) per class (``kr_c`` (b, nc, 3) // R).

    Added one by one in pose order into float32, as ``scatter_add_`` over the
    poses' classes adds them: the same bits, without the (b, poses) class table.
    """
    b, nc = kr_c.shape[:2]
    out = np.zeros((b, n_classes), dtype=np.float32)
    _split(_class_sums, np.ones(b), (_np(post.float()), _np(kr_c.long()), int(R), post.shape[1] // (3 * nc), out))
    return torch.from_numpy(out)


def turn_rows(S: Tensor, Q: Tensor, rooms: Tensor, turn: Tensor, target: Tensor, n_targets: int, src: Tensor,
              sign: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of per-(class, rotation) sums turned by quarter turns and added onto their targets, in one pass.

    ``out_S[target[e]] += T(S[rooms[e]])`` with T the point permutation ``src[turn[e]]`` and the imaginary
    parts times ``sign[turn[e]]`` (:meth:`cryo2d.em.mstep.PoseSums._flush`), and likewise for Q
    without the sign. Each target's rows are added in the order given, which must be that of
    their turns: the same additions, in the same order, as the gathers and ``index_add_`` of
    the torch code, so the bits are torch's.

    Parameters
    ----------
    S : (rows, m, 2) float32 tensor, Q : (rows, m) float32 tensor
    rooms, turn, target : (e,) int64 tensors
        Each row to add: its room in S and Q, its turn (row of ``src``), its target (sorted).
    n_targets : int
    src : (n, m) int64 tensor, sign : (n, m) float32 tensor

    Returns
    -------
    (n_targets, m, 2) and (n_targets, m) float32 tensors
    """
    m = S.shape[1]
    out_S = np.zeros((n_targets, m, 2), dtype=np.float32)
    out_Q = np.zeros((n_targets, m), dtype=np.float32)
    counts = torch.bincount(target, minlength=n_targets)
    starts = _starts(counts)
    args = (_np(starts), _np(rooms.long()), _np(turn.long()), S.numpy(), Q.numpy(), _np(src.long()),
            _np(sign.float()), out_S, out_Q)
    _split(_turn_rows, counts.numpy(), args)
    return torch.from_numpy(out_S), torch.from_numpy(out_Q)


def grow_regions(support: Tensor, seed: Tensor) -> Tensor:
    """The pixels of ``support`` 8-connected to a pixel of ``seed`` within it (flood fill), per image.

    Parameters
    ----------
    support, seed : (K, b, w) bool tensors

    Returns
    -------
    (K, b, w) bool tensor: the support's regions that hold a seed pixel, whole.
    """
    sup = _np(support.bool())
    out = np.zeros(sup.shape, dtype=np.bool_)
    _split(_grow_regions, np.ones(len(sup)), (sup, _np(seed.bool()), out))
    return torch.from_numpy(out)


def coarse_images(P: Tensor, phases: Tensor) -> Tensor:
    """The coarse stage's de-shifted images in bfloat16: ``view_as_real(P[:, None] * phases[None]).to(bfloat16)``
    reshaped to (b · Tc, 2 · Mc), in one pass.

    Torch makes the complex products in float32, then a second pass rounds
    them; here each row is rounded as it is made, with torch's arithmetic
    (products and sums rounded one by one) and rounding (to nearest even),
    so the bits are torch's (ribosome 80 px, K = 24: the images of a
    chunk of 512 particles × 49 coarse shifts, 220 points).

    Parameters
    ----------
    P : (b, Mc) complex64 tensor
        The particles' weighted data at the coarse points.
    phases : (Tc, Mc) complex64 tensor
        De-shift phases of the coarse shifts at those points.

    Returns
    -------
    (b · Tc, 2 · Mc) bfloat16 tensor: real and imaginary parts interleaved.
    """
    b, (Tc, Mc) = P.shape[0], phases.shape
    out = np.empty((b * Tc, 2 * Mc), dtype=np.uint16)
    _split(_coarse_images16, np.ones(b), (_np(P), _np(phases), out))
    return torch.from_numpy(out).view(torch.bfloat16)


def coarse_images_split(P: Tensor, phases: Tensor) -> Tensor:
    """The coarse stage's de-shifted images ``P[:, None] * phases[None]`` for the products on half-turn pairs:
    (b · Tc, 2 · Mc) float32, each row's Mc real parts, then its Mc imaginary parts, made in one
    pass (torch made the complex products, then copied them into this order).

    ``P`` (b, Mc) and ``phases`` (Tc, Mc) complex64, as for :func:`coarse_images`.
    """
    b, (Tc, Mc) = P.shape[0], phases.shape
    out = np.empty((b * Tc, 2 * Mc), dtype=np.float32)
    _split(_coarse_images_split, np.ones(b), (_np(P), _np(phases), out))
    return torch.from_numpy(out)


def coarse_images8(P: Tensor, phases: Tensor, balance: Tensor) -> tuple[Tensor, Tensor]:
    """The coarse stage's de-shifted images for the int8 product, quantised in one pass.

    Row ``i · Tc + t`` is ``P[i] · a · phases[t]`` (``a`` the ``balance`` of
    each point), its Mc real parts then its Mc imaginary parts, divided by the
    particle's scale and rounded to the nearest integer (half to even), as
    int8. A particle's scale is max_j |P[i, j]| · a_j / 127: the phases have
    modulus 1, so no part of any of its rows exceeds 127 in magnitude, and all
    its rows share the scale (a column's best shift is then that of its
    largest integer correlation). ``P`` (b, Mc) and ``phases`` (Tc, Mc) complex64
    as for :func:`coarse_images`; ``balance`` (Mc,) float32, positive
    (:func:`cryo2d.em.estep.coarse_references`).

    Returns
    -------
    rows : (b · Tc, 2 · Mc) int8 tensor
    scale : (b,) float32 tensor; 0 for a particle that is 0 at every point.
    """
    b, (Tc, Mc) = P.shape[0], phases.shape
    out = np.empty((b * Tc, 2 * Mc), dtype=np.int8)
    scale = np.empty(b, dtype=np.float32)
    _split(_coarse_images8, np.ones(b), (_np(P), _np(phases), _np(balance.float()), out, scale))
    return torch.from_numpy(out), torch.from_numpy(scale)


def coarse_max(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``scores.amax(dim=1).float()`` and ``scores.argmax(dim=1)`` for bfloat16 ``scores`` (b, Tc, KRc), in one pass.

    Each column's best row (the first of equal ones, as torch's ``argmax``)
    and its value: bfloat16 bits compared as integers in the order of their
    values, row after row so that the columns are read contiguously, the
    scores once instead of twice (ribosome 80 px, K = 24, a pass of 2,400
    particles: torch's ``amax`` and the candidates' ``argmax`` 0.11 -> 0.10
    s). Returns (b, KRc) float32 and int64 tensors.
    """
    b, _, n = scores.shape
    best = np.zeros((b, n), dtype=np.int32)
    arg = np.zeros((b, n), dtype=np.int64)
    _split(_coarse_max16, np.ones(b), (_np(scores.view(torch.int16)), best, arg))
    return torch.from_numpy(best.view(np.float32)), torch.from_numpy(arg)


def coarse_max_pairs(re: Tensor, im: Tensor) -> tuple[Tensor, Tensor]:
    """Each coarse column's best shift and score from the two products of half-turn pairs, in one pass.

    ``re`` and ``im`` (b, Tc, K, h) are Σ Re·Re and Σ Im·Im of each particle's
    de-shifted coarse images (row t) against rotations 0 … h − 1 of each class
    (:func:`cryo2d.em.estep.coarse_references` with ``pairs``): rotation r scores
    ``re + im``, its half turn r + h scores ``re − im``. Returns the scores' maximum
    over the rows and its row (the first of equal ones, as torch's ``argmax``), as
    (b, K · 2h) float32 and int64 tensors in the columns' order k · 2h + r,
    without the (b, Tc, K · 2h) table of scores. Int32 ``re`` and ``im`` (the int8
    products, :func:`coarse_images8`) give int32 maxima, exact.
    """
    b, _, K, h = re.shape
    best = np.empty((b, K, 2 * h), dtype=np.int32 if re.dtype == torch.int32 else np.float32)
    arg = np.empty((b, K, 2 * h), dtype=np.int64)
    _split(_coarse_max_pairs, np.ones(b), (_np(re), _np(im), best, arg))
    return torch.from_numpy(best.reshape(b, -1)), torch.from_numpy(arg.reshape(b, -1))

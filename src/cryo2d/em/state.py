"""Mutable state of a run and its checkpoints (atomic, resumable)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryo2d.em.config import FLAGS
from cryo2d.errors import Cryo2DError
from cryo2d.io.outputs import atomic_path

_VERSION = 1


@dataclass
class RunState:
    """Everything that changes during a run.

    Class quantities live at the M-step points (m of them); per-particle
    arrays have length n. ``sigma2_shell`` and ``tau2`` are per Fourier shell.
    """

    A: Tensor  # (K, m) complex class transforms
    num: Tensor  # (K, m) complex running sums
    den: Tensor  # (K, m) float running sums
    counts: Tensor  # (K,) float64 running class occupancy
    noise_sum: Tensor  # (n_shells,) float64
    noise_cnt: Tensor  # (n_shells,) float64
    sigma2_shell: Tensor  # (n_shells,)
    tau2: Tensor  # (K, n_shells)
    log_prior: Tensor  # (K,)
    res_shell: Tensor  # (K,) int64
    r_res: float
    class_index: np.ndarray  # (n,) int64, -1 = not yet seen
    psi_rad: np.ndarray
    shift_work: np.ndarray  # (n, 2) working px
    max_prob: np.ndarray
    class_post: np.ndarray
    class_ess: np.ndarray
    scale: np.ndarray
    r_res_sums: float = 1.0  # r_res of the running sums as they are (online: particles counted repeatedly)
    null_class: int = -1  # the empty-box class (reference fixed at 0); -1 = not yet, -2 = released
    grow_failures: int = 0  # consecutive growing attempts that placed no class (Engine._reseed_empty)
    grow_wait: int = 0  # online iterations left before the next growing attempt
    history: list = field(default_factory=list)


def new_state(n: int, K: int, m: int, n_shells: int, device) -> RunState:
    """A blank state for n particles, K classes, m M-step points."""
    z = lambda *shape, **kw: torch.zeros(shape, device=device, **kw)  # noqa: E731
    return RunState(
        A=z(K, m, dtype=torch.complex64),
        num=z(K, m, dtype=torch.complex64),
        den=z(K, m),
        counts=z(K, dtype=torch.float64),
        noise_sum=z(n_shells, dtype=torch.float64),
        noise_cnt=z(n_shells, dtype=torch.float64),
        sigma2_shell=torch.ones(n_shells, device=device),
        tau2=torch.ones((K, n_shells), device=device),
        log_prior=torch.full((K,), -float(np.log(K)), device=device),
        res_shell=torch.ones(K, dtype=torch.int64, device=device),
        r_res=1.0,
        class_index=np.full(n, -1, dtype=np.int64),
        psi_rad=np.zeros(n, dtype=np.float32),
        shift_work=np.zeros((n, 2), dtype=np.float32),
        max_prob=np.zeros(n, dtype=np.float32),
        class_post=np.zeros(n, dtype=np.float32),
        class_ess=np.zeros(n, dtype=np.float32),
        scale=np.ones(n, dtype=np.float32),
    )


def particles_digest(particles) -> str:
    """SHA-1 of what tells one particle set from another: each particle's image (stack file name
    without its folder, and image number), pixel size and defocus, and the input origins the
    search starts from (``prior_shift_px``, px, where the set has them).

    Not the folders: a job and its data moved together, or a stack folder mounted elsewhere,
    still resume. Another stack of the same name and length (a second simulation, another
    micrograph's extraction) differs in its defocus values. The same images with other origins
    (an earlier Class2D's or Select's particles.star) differ too: a checkpoint's shifts are
    from its own origins, and the written origins add them to the file's.
    """
    h = hashlib.sha1()
    stack, rows = particles.stack, slice(None)
    if hasattr(stack, "rows") and hasattr(stack, "stack"):  # the images left by --skip-bad (cryo2d.classify._Subset)
        stack, rows = stack.stack, np.asarray(stack.rows)
    if hasattr(stack, "names") and hasattr(stack, "file_index"):
        names = [os.path.basename(str(n)) for n in stack.names]
        h.update("\n".join(names).encode("utf-8"))
        h.update(np.ascontiguousarray(np.asarray(stack.file_index)[rows], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(np.asarray(stack.image_index)[rows], dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(particles.pixel_size_angst, dtype=np.float64).tobytes())
    if particles.ctf is not None:
        for values in (particles.ctf.defocus_u_angst, particles.ctf.defocus_v_angst, particles.ctf.defocus_angle_deg):
            h.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    prior = getattr(particles, "prior_shift_px", None)
    if prior is not None:  # none (no origins, --no-input-shifts): the digest of earlier versions
        h.update(b"origins")
        h.update(np.ascontiguousarray(prior, dtype=np.float64).tobytes())
    return h.hexdigest()


def save_checkpoint(engine, path: Path, next_iteration: int) -> None:
    """Write the state, the RNG and the iteration counter atomically."""
    path = Path(path)
    s = engine.state
    payload = {
        "version": _VERSION,
        "next_iteration": next_iteration,
        "config": engine.config.to_dict(),
        "n_particles": len(engine.particles),
        "particles_digest": particles_digest(engine.particles),
        "rng": engine.rng.bit_generator.state,
        "state": {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in s.__dict__.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _difference(field: str, theirs, ours) -> str:
    """A setting in which the checkpoint and this run differ, by its option: an on/off option by its
    name alone, another with both values (``default``: the option left out)."""
    flag = FLAGS.get(field, field)
    if isinstance(ours, bool) and isinstance(theirs, bool):
        return flag
    shown = lambda v: "default" if v is None else format(v, "g") if isinstance(v, float) else str(v)  # noqa: E731
    return f"{flag} {shown(theirs)} there, {shown(ours)} now"


def load_checkpoint(engine, path: Path) -> int:
    """Restore ``engine`` from ``path``; returns the iteration to continue from."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged checkpoint is a user-visible problem
        raise Cryo2DError(f"{path}: cannot read checkpoint ({type(err).__name__})") from None
    digest = particles_digest(engine.particles)
    same = payload.get("n_particles") == len(engine.particles) and payload.get("particles_digest", digest) == digest
    if payload.get("version") != _VERSION or not same:
        raise Cryo2DError(f"{path}: checkpoint is from a different dataset or version; remove it or drop --resume")
    ours = engine.config.to_dict()
    theirs = payload["config"]
    diff = [_difference(k, theirs.get(k), ours[k]) for k in ours if ours[k] != theirs.get(k)]
    if diff:
        raise Cryo2DError(f"{path}: checkpoint was made with other settings ({'; '.join(diff)}); give the same "
                          "options, or drop --resume to start again")
    for k, v in payload["state"].items():
        setattr(engine.state, k, v.to(engine.device) if isinstance(v, Tensor) else v)
    engine.rng.bit_generator.state = payload["rng"]
    return int(payload["next_iteration"])

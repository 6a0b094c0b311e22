"""Configuration of a 2D classification run: every user-facing parameter.

Defaults and meanings follow CryoSPARC's 2D classification (DESIGN §2).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from cryo2d.errors import Cryo2DError

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
#: The option of ``cryo2d classify`` that sets each field, as an error message names it (a
#: checkpoint made with other settings). ``chunk_size`` has none: the Python API alone sets it.
FLAGS = {
    "n_classes": "--classes", "max_res_angst": "--max-res", "average_res_angst": "--average-res",
    "max_align_res_angst": "--max-align-res", "min_align_res_angst": "--min-align-res", "start": "--start",
    "n_online_iterations": "--online-iterations", "batch_size_per_class": "--batch-per-class",
    "n_full_iterations": "--full-iterations", "uncertainty_factor": "--uncertainty-factor",
    "anneal_start": "--anneal-start", "anneal_iterations": "--anneal-iterations", "white_noise": "--white-noise",
    "force_max": "--[no-]force-max", "mask_diameter_angst": "--mask-diameter",
    "mask_diameter_outer_angst": "--mask-diameter-outer", "auto_mask": "--[no-]auto-mask",
    "flatten_solvent": "--[no-]flatten-solvent", "recenter": "--[no-]recenter",
    "recenter_threshold": "--recenter-threshold", "zeropad": "--zeropad", "estimate_scale": "--estimate-scale",
    "clamp_solvent": "--clamp-solvent", "non_negative": "--non-negative", "align_filaments": "--align-filaments",
    "use_ctf": "--no-ctf", "invert_contrast": "--[no-]invert-contrast", "input_shifts": "--[no-]input-shifts",
    "psi_step_deg": "--psi-step", "shift_range_px": "--shift-range", "shift_step_px": "--shift-step",
    "coarse_to_fine": "--exhaustive", "hard_last": "--[no-]hard-last", "empty_class": "--[no-]empty-class",
    "remove_duplicates": "--remove-duplicates/--keep-duplicates", "min_separation_angst": "--min-separation",
    "sort_classes": "--no-sort", "seed": "--seed", "tau2_fudge": "--tau2-fudge", "chunk_size": "chunk_size",
}
#: The float parameters and their flags (each must be finite).
_FLOAT_FLAGS = {name: FLAGS[name] for name in (
    "max_res_angst", "average_res_angst", "max_align_res_angst", "min_align_res_angst", "uncertainty_factor",
    "mask_diameter_angst", "mask_diameter_outer_angst", "recenter_threshold", "psi_step_deg", "shift_range_px",
    "shift_step_px", "min_separation_angst", "tau2_fudge",
)}
#: The starting classes a run can have (``EMConfig.start``, :mod:`cryo2d.em.start`).
STARTS = ("split", "random")


def check_device(device: str) -> str:
    """``device`` if it names the CPU or a CUDA device that is present ("cpu", "cuda", "cuda:N"); else Cryo2DError."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise Cryo2DError(f"--device {device}: unknown device (cpu, cuda or cuda:N)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise Cryo2DError(f"--device {device} asked for, but no CUDA device is available")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise Cryo2DError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


@dataclass(frozen=True)
class EMConfig:
    """Parameters of the online-EM 2D classification.

    Resolutions are in Å, angles in degrees, shifts in pixels of the input
    box. ``None`` means "derive from the data" as described per field.
    """

    n_classes: int = 50
    #: Highest resolution of the iterations' classes and of the search
    #: (Fourier crop of the data), Å.
    max_res_angst: float = 6.0
    #: Resolution of the written class averages: a last pass rebuilds each
    #: class at it from its particles' final poses (None = Nyquist of the
    #: input; equal to max_res_angst: no pass), Å.
    average_res_angst: float | None = None
    #: Highest resolution used by the E-step (None = max_res_angst), Å.
    max_align_res_angst: float | None = None
    #: Lowest resolution used by the E-step, a high-pass (None = keep all), Å.
    min_align_res_angst: float | None = None
    #: Starting classes: "split" grows them from one class by binary splitting
    #: (:mod:`cryo2d.em.start`); "random" averages random subsets at random angles.
    start: str = "split"
    n_online_iterations: int = 20
    batch_size_per_class: int = 100
    #: Passes over all particles after the online iterations. A whole run
    #: makes at least one, which gives every particle its class (0 is for
    #: callers that drive the online iterations alone, as the split start's
    #: stages do; ``--full-iterations`` asks for 1 or more).
    n_full_iterations: int = 1
    #: Initial classification uncertainty factor: sigma^2 x factor at the start.
    uncertainty_factor: float = 2.0
    anneal_start: int = 2
    anneal_iterations: int = 15
    white_noise: bool = False
    #: CryoSPARC's "force max over poses/shifts": the M-step takes a particle at one pose per
    #: class instead of averaging over its probable poses: at each probable class's best
    #: (rotation, shift), weighted by the class's posterior, in sets of fewer than
    #: ``engine.MAX_POSE_BELOW`` particles per class, else at its best (class, pose) alone;
    #: None = on unless K <= 20.
    force_max: bool | None = None
    #: Inner diameter of the soft circular mask, Å (None = the box: corners only).
    mask_diameter_angst: float | None = None
    #: Outer diameter of the soft edge, Å (None = 1.2 x inner).
    mask_diameter_outer_angst: float | None = None
    #: Mask each class around its own density for the search (within the
    #: circular mask): the noise outside the particle stays out of it.
    auto_mask: bool = True
    #: Write the class averages masked as the search sees them (each class's
    #: own mask with ``auto_mask``, else the circular mask): flat solvent, as
    #: RELION's --flatten_solvent and CryoSPARC's masked classes.
    flatten_solvent: bool = True
    recenter: bool = True
    recenter_threshold: float = 0.2
    #: Fourier oversampling of classes for rotation interpolation (1 or more).
    zeropad: int = 2
    #: Per-particle scale: least squares at the best pose from the second
    #: iteration on, each batch's normalised to a median of 1 (as RELION
    #: normalises its scale corrections).
    estimate_scale: bool = False
    clamp_solvent: bool = False
    non_negative: bool = False
    align_filaments: bool = False
    use_ctf: bool = True
    #: Multiply the images by -1 as they are read (protein dark in the stack);
    #: None = when the particles look dark (:mod:`cryo2d.contrast`). Applied by
    #: ``cryo2d.classify.classify`` and the stream before the engine sees them.
    invert_contrast: bool | None = None
    #: Start each particle from the shift its file gives (RELION's
    #: _rlnOriginX/Y[Angst], ``ParticleSet.prior_shift_px``), as RELION's
    #: Class2D does; False searches around the box centre.
    input_shifts: bool = True
    #: In-plane angular step, degrees (None = from the current resolution).
    psi_step_deg: float | None = None
    #: Largest shift searched, px of the input box (None = 10 % of the box),
    #: around the particle's input shift (``input_shifts``).
    shift_range_px: float | None = None
    #: Shift grid step, px of the input box (None = one working pixel).
    shift_step_px: float | None = None
    #: Search a coarse grid (half the angles, a quarter of the shifts, half
    #: the resolution, or all of it below 24 Fourier px) first, then the fine
    #: grid around the best poses.
    coarse_to_fine: bool = True
    hard_last: bool = True
    #: Keep one class for empty boxes: its reference is zero, and a particle
    #: goes there when no class explains it better than noise alone.
    empty_class: bool = True
    remove_duplicates: bool = True
    #: Duplicate separation, Å (None = 0.5 x particle diameter).
    min_separation_angst: float | None = None
    sort_classes: bool = True
    seed: int = 0
    #: RELION's tau2_fudge: multiplies the estimated signal power (regularisation).
    tau2_fudge: float = 2.0
    #: Particles per E-step chunk (memory bound); None = automatic.
    chunk_size: int | None = None

    @property
    def force_max_effective(self) -> bool:
        """Whether the M-step takes each class's best pose alone (CryoSPARC: auto off at <= 20 classes)."""
        if self.force_max is None:
            return self.n_classes > 20
        return bool(self.force_max)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise Cryo2DError for values that make no sense."""
        for name, flag in _FLOAT_FLAGS.items():  # inf or NaN: a traceback, or every pick a duplicate, before
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise Cryo2DError(f"{flag} must be a finite number, got {value}")
        checks = [
            (self.n_classes >= 1, "--classes must be at least 1"),
            (self.max_res_angst > 0, "--max-res must be positive"),
            (self.max_align_res_angst is None or self.max_align_res_angst > 0, "--max-align-res must be positive"),
            (self.average_res_angst is None or self.average_res_angst > 0, "--average-res must be positive"),
            (
                self.average_res_angst is None or self.average_res_angst <= self.max_res_angst,
                f"--average-res {self.average_res_angst or 0:g} Å is a lower resolution (larger Å) than --max-res "
                f"{self.max_res_angst:g} Å: the averages are written at least as fine as the classes the iterations "
                "refine (give a larger --max-res as well)",
            ),
            (
                self.max_align_res_angst is None or self.max_align_res_angst >= self.max_res_angst,
                f"--max-align-res {self.max_align_res_angst or 0:g} Å is a higher resolution (smaller Å) than --max-res "
                f"{self.max_res_angst:g} Å: the search has no class frequencies beyond --max-res (give a smaller "
                "--max-res as well)",
            ),
            (
                self.min_align_res_angst is None
                or self.min_align_res_angst > (self.max_align_res_angst or self.max_res_angst),
                "--min-align-res must be a lower resolution (larger Å) than --max-align-res",
            ),
            (self.n_online_iterations >= 0, "--online-iterations must be >= 0"),
            (self.batch_size_per_class >= 1, "--batch-per-class must be >= 1"),
            (self.n_full_iterations >= 0, "--full-iterations must be >= 0"),
            (self.n_online_iterations + self.n_full_iterations >= 1, "need at least one iteration"),
            (self.uncertainty_factor >= 1, "--uncertainty-factor must be >= 1"),
            (self.anneal_start >= 0 and self.anneal_iterations >= 0, "annealing iterations must be >= 0"),
            (self.zeropad >= 1, "--zeropad must be >= 1"),
            (0 < self.recenter_threshold < 1, "--recenter-threshold must be in (0, 1)"),
            (self.psi_step_deg is None or 0 < self.psi_step_deg <= 180, "--psi-step must be in (0, 180]"),
            (self.shift_range_px is None or self.shift_range_px >= 0, "--shift-range must be >= 0"),
            (self.shift_step_px is None or self.shift_step_px > 0, "--shift-step must be positive"),
            (self.tau2_fudge > 0, "--tau2-fudge must be positive"),
            (self.mask_diameter_angst is None or self.mask_diameter_angst > 0, "--mask-diameter must be positive"),
            (self.min_separation_angst is None or self.min_separation_angst > 0, "--min-separation must be positive"),
            (self.seed >= 0, "--seed must be >= 0"),
            (self.start in STARTS, f"--start {self.start}: not one of {', '.join(STARTS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise Cryo2DError(message)

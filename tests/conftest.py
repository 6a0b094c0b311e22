"""Shared fixtures: small simulated data sets and tiny engine configurations."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryo2d.em.config import EMConfig
from cryo2d.io import ArrayStack
from cryo2d.particles import CTFParams, ParticleSet


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a test that takes minutes (runs by default; deselect with -m 'not slow')"
    )


@dataclass
class SimData:
    """A simulation written to ``folder`` (particles.star, truth.csv, ...)."""

    sim: object
    folder: Path

    @property
    def star(self) -> Path:
        return self.folder / "particles.star"

    @property
    def truth(self) -> pd.DataFrame:
        return self.sim.truth


@pytest.fixture(scope="session")
def bundled_volume():
    from cryo2d.simulate import bundled_map_path, read_map

    return read_map(bundled_map_path())


@pytest.fixture(scope="session")
def sim3(bundled_volume, tmp_path_factory) -> SimData:
    """300 particles, 32 px, SNR 10, three equally likely discrete views, no junk."""
    from cryo2d.simulate import simulate, write_simulation

    sim = simulate(*bundled_volume, n_particles=300, box=32, snr=10.0, junk_fraction=0.0,
                   views="discrete", n_views=3, rare_view_fraction=1 / 3, seed=0)
    folder = tmp_path_factory.mktemp("sim3")
    write_simulation(sim, folder)
    return SimData(sim, folder)


@pytest.fixture(scope="session")
def particles3(sim3) -> ParticleSet:
    """``sim3`` read back from its STAR file (with CTF)."""
    from cryo2d.io import read_particles

    return read_particles(sim3.star)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the same float sums in runs that must agree bit for bit)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> EMConfig:
    """A fast configuration: 3 classes, 3 online iterations of 20 per class, one full pass.

    From the random start: the tests that take it count the main run's passes and objects,
    which the split start's stages (tests/em/test_start.py) would add to."""
    values = dict(n_classes=3, n_online_iterations=3, batch_size_per_class=20, n_full_iterations=1, seed=0,
                  start="random")
    values.update(overrides)
    return EMConfig(**values)


def memory_particles(images: np.ndarray, pixel_size_angst: float = 4.0, ctf: CTFParams | None = None,
                     table: pd.DataFrame | None = None) -> ParticleSet:
    """An in-memory STAR-like ParticleSet of ``images`` (n, box, box)."""
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    return ParticleSet(
        stack=ArrayStack(images),
        ctf=ctf,
        pixel_size_angst=np.full(n, float(pixel_size_angst)),
        table=table if table is not None else pd.DataFrame(index=range(n)),
        source=Path("mem"),
        kind="star",
        extra={},
    )


def constant_ctf(n: int, defocus_angst: float = 15000.0) -> CTFParams:
    """The same CTF for n particles (300 kV, 2.7 mm, Q0 0.1)."""
    full = lambda v: np.full(n, float(v))  # noqa: E731
    return CTFParams(
        defocus_u_angst=full(defocus_angst), defocus_v_angst=full(defocus_angst), defocus_angle_deg=full(0),
        voltage_kv=full(300), cs_mm=full(2.7), amplitude_contrast=full(0.1), phase_shift_deg=full(0),
        bfactor_angst2=full(0),
    )


def relocatable_star(sim) -> tuple[dict, float, float]:
    """``sim``'s STAR blocks with absolute stack paths (so copies can be written anywhere), its
    pixel size (Å) and the CTF B-factor (Å²) whose envelope exp(-B s²/4) is 1000 at Nyquist."""
    import starfile

    blocks = starfile.read(sim.star, always_dict=True)
    pixel = float(blocks["optics"]["rlnImagePixelSize"].iloc[0])
    names = blocks["particles"]["rlnImageName"].str.split("@", n=1, expand=True)
    blocks["particles"]["rlnImageName"] = names[0] + "@" + str(sim.folder.resolve()) + "/" + names[1]
    return blocks, pixel, -4.0 * np.log(1000.0) * (2.0 * pixel) ** 2


@pytest.fixture(scope="session")
def helpers():
    """The module-level helpers of this conftest, for tests in sub-folders."""
    import types

    return types.SimpleNamespace(tiny_config=tiny_config, memory_particles=memory_particles,
                                 constant_ctf=constant_ctf, relocatable_star=relocatable_star)

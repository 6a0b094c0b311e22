"""Pick centres in Å for duplicate removal: micrograph pixels times the micrograph's pixel size."""
from __future__ import annotations

import numpy as np
import pytest

from cryo2d.em.finalize import duplicate_mask
from cryo2d.io.star import read_star
from cryo2d.picks import pick_locations

OPTICS = """data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
og1 1 0.885 200 1.4 0.1 3.54 64 2
"""

PARTICLES = """
data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnCoordinateX #3
_rlnCoordinateY #4
_rlnDefocusU #5
_rlnDefocusV #6
_rlnDefocusAngle #7
{column}1@s.mrcs mic1.mrc 100 200 10000 10000 0{value}
2@s.mrcs mic1.mrc 140 200 10000 10000 0{value}
"""


@pytest.mark.parametrize("with_group", [True, False], ids=["group column", "one group, no column"])
def test_star_picks_are_in_micrograph_pixels(tmp_path, with_group):
    """RELION 3.1: _rlnCoordinateX/Y in micrograph px (0.885 Å here), not in the extracted images' 3.54 Å."""
    text = OPTICS + PARTICLES.format(column="_rlnOpticsGroup #8\n" if with_group else "",
                                     value=" 1" if with_group else "")
    (tmp_path / "p.star").write_text(text)
    particles = read_star(tmp_path / "p.star", open_stacks=False)
    micrographs, xy = pick_locations(particles)
    assert micrographs.tolist() == ["mic1.mrc", "mic1.mrc"]
    np.testing.assert_allclose(xy, [[88.5, 177.0], [123.9, 177.0]], rtol=1e-12)
    # 35.4 Å apart: one of the two goes at a 75 Å separation, the better scored stays.
    assert duplicate_mask(micrographs, xy, np.array([0.8, 0.9]), 75.0).tolist() == [False, True]

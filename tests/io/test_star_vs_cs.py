"""The same particles via .star and via .cs give identical images and CTF (cf. cryoDRGN test_loading_csfile)."""
import numpy as np
from particle_files import make_cs_dataset

from cryo2d.io import read_particles


def test_star_and_cs_agree(tmp_path):
    star, cs, images, _ = make_cs_dataset(tmp_path, n=10, box=12)
    from_star = read_particles(star)
    from_cs = read_particles(cs)
    everything = np.arange(10)
    np.testing.assert_array_equal(from_star.stack.read(everything), from_cs.stack.read(everything))
    np.testing.assert_array_equal(from_cs.stack.read(everything), images)
    assert from_star.box == from_cs.box == 12
    np.testing.assert_allclose(from_star.pixel_size_angst, from_cs.pixel_size_angst, rtol=1e-7)
    for field, values in from_star.ctf.__dict__.items():
        np.testing.assert_allclose(getattr(from_cs.ctf, field), values, rtol=1e-6, atol=1e-4, err_msg=field)

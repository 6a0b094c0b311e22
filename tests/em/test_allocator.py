"""glibc heap tuning: freed E-step intermediates are reused, and the heap is trimmed once it has grown."""
from __future__ import annotations

import numpy as np
import pytest

from cryo2d.em import data

pytestmark = pytest.mark.skipif(data._LIBC is None or data._rss_bytes() is None, reason="needs glibc and /proc")

MB = 1 << 20


def _touch_and_free(nbytes: int) -> None:
    a = np.ones(nbytes // 8)  # writes every page
    del a


def test_freed_buffer_stays_in_the_heap_then_trim_returns_it(monkeypatch):
    data.tune_allocator()
    data._LIBC.malloc_trim(0)
    base = data._rss_bytes()
    _touch_and_free(200 * MB)
    kept = data._rss_bytes() - base
    # Above glibc's default mmap threshold (32 MB) this buffer would be unmapped on free.
    assert kept > 150 * MB
    monkeypatch.setattr(data, "_working_rss", [])
    monkeypatch.setattr(data, "TRIM_GROWTH_BYTES", 64 * MB)
    data.release_free_heap()  # first call after a trim: records the working level only
    assert data._rss_bytes() - base > 150 * MB
    assert data._working_rss and data._working_rss[0] > base + 150 * MB
    data.release_free_heap()  # not grown past the level: nothing trimmed
    assert data._rss_bytes() - base > 150 * MB
    data._working_rss[0] = base  # pretend the working level was the base: grown by 200 MB > 64 MB
    data.release_free_heap()
    assert data._rss_bytes() - base < 50 * MB
    assert data._working_rss == []

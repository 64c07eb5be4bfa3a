"""Direct I/O helpers: the bytes written and read equal the data, on either path, for any size,
offset and buffer alignment; the probe says 0 where O_DIRECT does not work. (tmpfs takes O_DIRECT
since Linux 6.6, so a refusing filesystem is simulated.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.direct_io import aligned_empty, probe_alignment, read_range, staging_bytes, write_file
from pipeline.errors import GenealignError


@pytest.fixture
def aligns(tmp_path) -> list[int]:
    """Buffered (0) always; the directory's O_DIRECT alignment where it has one."""
    probed = probe_alignment(tmp_path)
    assert probed in (0, 512, 4096)
    return [0] + ([probed] if probed else [])


def test_aligned_empty_is_aligned():
    for align in (1, 512, 4096):
        for shape in ((3,), (7, 5), (1000, 3)):
            array = aligned_empty(shape, np.float32, align)
            assert array.shape == shape and array.dtype == np.float32
            assert array.ctypes.data % align == 0


def test_probe_says_zero_where_o_direct_is_refused(tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT at open (EINVAL) means buffered I/O; the probe file goes."""
    import errno

    import pipeline.direct_io as direct_io

    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    assert probe_alignment(tmp_path) == 0
    assert list(tmp_path.iterdir()) == []


def test_write_file_writes_exactly_the_bytes(tmp_path, aligns):
    rng = np.random.default_rng(0)
    for align in aligns:
        for size in (0, 1, 511, 512, 513, 4096, 5000, 70_001):
            raw = rng.integers(0, 256, size + 3, dtype=np.uint8)
            for offset in (0, 3):  # an aligned buffer, then one 3 bytes off (copied before a direct write)
                data = raw[offset:offset + size]
                path = tmp_path / f"w{align}_{size}_{offset}"
                path.write_bytes(b"old contents that must go")  # truncated, not overwritten in place
                write_file(path, data, align)
                assert path.read_bytes() == data.tobytes()
        float_rows = rng.normal(size=(37, 3, 5)).astype(np.float32)  # (rows, G, D), 60-byte rows
        write_file(tmp_path / "rows", float_rows, align)
        np.testing.assert_array_equal(np.fromfile(tmp_path / "rows", np.float32).reshape(37, 3, 5), float_rows)



def test_write_file_at_an_offset_keeps_the_rest_of_the_file(tmp_path, aligns):
    """`offset=`: the bytes land there (direct when the offset is aligned, else through the cache),
    nothing before or after them changes, and a missing file is created (a hole before them)."""
    rng = np.random.default_rng(1)
    for align in aligns:
        for at in (0, 3, 512, 4096, 5000):
            for size in (1, 512, 4097):
                old = rng.integers(0, 256, 12_000, dtype=np.uint8).tobytes()
                data = aligned_empty((size,), np.uint8)
                data[:] = rng.integers(0, 256, size, dtype=np.uint8)
                path = tmp_path / f"o{align}_{at}_{size}"
                path.write_bytes(old)
                write_file(path, data, align, offset=at)
                expected = old[:at] + data.tobytes() + old[at + size:]
                assert path.read_bytes() == expected
                fresh = tmp_path / f"n{align}_{at}_{size}"
                write_file(fresh, data, align, offset=at)
                assert fresh.read_bytes() == bytes(at) + data.tobytes()

def test_read_range_returns_exactly_the_bytes(tmp_path, aligns):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 50_000, dtype=np.uint8)
    path = tmp_path / "r"
    path.write_bytes(data.tobytes())
    for align in aligns:
        staging = aligned_empty((staging_bytes(20_000, align),), np.uint8)
        ranges = [(0, 0), (0, 1), (0, 50_000 if align == 0 else 20_000), (511, 513), (1000, 21_000),
                  (49_999, 50_000), (30_000, 50_000)]
        ranges += [tuple(sorted(rng.integers(0, 50_001, 2))) for _ in range(40)]
        for start, stop in ranges:
            if stop - start > 20_000:
                stop = start + 20_000
            got = read_range(path, int(start), int(stop), staging, align)
            assert got.tobytes() == data[start:stop].tobytes(), (align, start, stop)


def test_read_range_past_the_end_is_a_clear_error(tmp_path, aligns):
    path = tmp_path / "short"
    path.write_bytes(bytes(1000))
    for align in aligns:
        staging = aligned_empty((staging_bytes(4000, align),), np.uint8)
        with pytest.raises(GenealignError, match="ended early"):
            read_range(path, 500, 3000, staging, align)


def test_a_full_disk_is_a_clear_error(tmp_path, aligns, monkeypatch):
    import errno

    import pipeline.direct_io as direct_io

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwrite", full)
    for align in aligns:
        with pytest.raises(GenealignError, match="no space left on the device.*free some space"):
            write_file(tmp_path / "f", np.zeros(4096, np.uint8), align)


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path, aligns, monkeypatch):
    """A filesystem that took the probe's write but refuses a later one (EINVAL) gets the bytes anyway."""
    import errno

    import pipeline.direct_io as direct_io

    if aligns == [0]:
        pytest.skip("no O_DIRECT here")
    real_pwrite = os.pwrite

    def picky(fd, data, offset):
        if fcntl_flags(fd) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", picky)
    data = np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8)
    write_file(tmp_path / "f", data, aligns[-1])
    assert (tmp_path / "f").read_bytes() == data.tobytes()


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)

"""Raw file I/O for the ingest's scratch tables and the store's chunk files, optionally past the
page cache (O_DIRECT): `ingest --direct-io`.

The ingest writes every byte twice (scratch, then store) and reads the scratch once. Through the page
cache (the default) the copy reads the scratch from memory and the store's pages reuse the scratch's
as the scratch is truncated; the bytes may never reach the disk before the store does. With O_DIRECT
they go from our buffers to the disk and back, so the page cache never grows by them. Measured on
10,000 subjects x 111 genes, 2-core development VM (ext4 on virtio, Firecracker: the hypervisor backs
guest memory lazily and takes back memory the guest has freed):

- memory already backed (as on any bare-metal machine; here: right after another job touched and
  freed it), `benchmarks/ingest.py`, three runs: through the page cache workers=2 took 5.8-6.0 s;
  with O_DIRECT 7.2-7.6 s: the copy then waits on the disk for the scratch's 1.5 GB round trip
  (2.0-2.2 s against 0.6 s from memory). An earlier version of the ingest measured the same gap with workers=1
  (7.0-7.9 s against 9.5-10.2 s).
- memory not backed (the first run after the machine sat idle): each new page of page cache costs
  the hypervisor ~2.7 s/GiB of CPU (`dd` of 1.5 GiB: 3.85 s of CPU into new page cache, 0.16 s with
  oflag=direct). In that state (single runs, one before and one after O_DIRECT was added) the
  workers=1 CSV phase took 9.3 s through the page cache and 7.3 s with O_DIRECT, and the ingest's
  CPU time 20 and 15 s. Which state a run meets depends on what ran before it and how long ago.

So: page cache by default; --direct-io where new memory is slow to come by (such VMs), where the
page cache is shared and worth keeping (a busy login node). Neither case was measured here
beyond the figures above.

O_DIRECT needs the buffer address, the file offset and the length aligned to the device's logical
block; what a directory's filesystem accepts is probed once (`probe_alignment`): 512, 4096, or 0
where O_DIRECT is refused (some network and FUSE filesystems), which means buffered I/O. A file's
unaligned tail is written through the page cache. Both paths write the same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import GenealignError

ALIGNMENTS = (512, 4096)


def probe_alignment(directory: Path) -> int:
    """The alignment O_DIRECT needs for new files in `directory` (512 or 4096), or 0 where it does not
    work there. Probed with a buffer aligned to exactly that many bytes (not more), written and read
    back at offset 0."""
    if not hasattr(os, "O_DIRECT"):
        return 0
    fd, name = tempfile.mkstemp(prefix=".direct-io-probe.", dir=directory)
    os.close(fd)
    try:
        for align in ALIGNMENTS:
            raw = np.zeros(4 * 4096, dtype=np.uint8)
            # address = align (mod 2 * align): aligned to `align`, not to anything larger
            start = (align - raw.ctypes.data) % (2 * align)
            buffer = raw[start:start + align]
            buffer[:] = 7
            try:
                fd = os.open(name, os.O_RDWR | os.O_TRUNC | os.O_DIRECT)
            except OSError:
                return 0
            try:
                if os.pwrite(fd, buffer, 0) == align and os.preadv(fd, [buffer], 0) == align and buffer[-1] == 7:
                    return align
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return 0
            finally:
                os.close(fd)
        return 0
    finally:
        os.unlink(name)


def aligned_empty(shape, dtype, align: int = 4096) -> np.ndarray:
    """np.empty whose data starts on an `align`-byte boundary (any buffer O_DIRECT reads or writes)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    align = max(align, 1)
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def write_file(path: Path, data: np.ndarray, align: int, offset: int | None = None) -> None:
    """Create (or truncate) `path` holding the bytes of `data`; with `offset`, write them at that byte
    of `path` instead (created if missing, never truncated). With align > 0 (and an aligned offset)
    the aligned prefix goes straight to disk (a misaligned `data` is copied into an aligned buffer
    first) and the tail, under `align` bytes, through the page cache. A full disk is a
    GenealignError naming the directory."""
    data = np.ascontiguousarray(data)
    size = data.nbytes
    at = offset or 0
    direct = size - size % align if align and at % align == 0 else 0
    if direct and data.ctypes.data % align:
        staged = aligned_empty(data.shape, data.dtype, align)
        staged[...] = data
        data = staged
    view = memoryview(data.reshape(-1).view(np.uint8))  # (size,) bytes
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset is None else 0)
    try:
        fd = os.open(path, flags | os.O_DIRECT if direct else flags, 0o644)
        try:
            done = 0
            if direct:
                try:
                    while done < direct:
                        done += os.pwrite(fd, view[done:direct], at + done)
                except OSError as exc:  # took the probe's write but not this one: all through the cache
                    if exc.errno != errno.EINVAL:
                        raise
                    done = 0
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            while done < size:
                done += os.pwrite(fd, view[done:], at + done)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise GenealignError(
                f"{Path(path).parent}: no space left on the device ({exc.strerror}); free some space or put the "
                "store on another disk (an ingest needs a little more than the store's size free while it runs)."
            ) from exc
        raise


def read_range(path: Path, start: int, stop: int, staging: np.ndarray, align: int) -> np.ndarray:
    """Bytes [start, stop) of `path` as a uint8 view into `staging` (an `aligned_empty` buffer of at
    least `staging_bytes(stop - start, align)` bytes). With align > 0 the covering aligned range is
    read straight from disk, bypassing the page cache."""
    lo = start - start % align if align else start
    hi = -(-stop // align) * align if align else stop
    assert staging.nbytes >= hi - lo, "staging buffer smaller than staging_bytes(stop - start, align)"
    window = staging[: hi - lo]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT if align else os.O_RDONLY)
    try:
        got = os.preadv(fd, [window], lo)
        if 0 < got < stop - lo and align:  # a short direct read (not at EOF): finish through the cache
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        while got < stop - lo:
            more = os.preadv(fd, [window[got:]], lo + got)
            if more <= 0:
                raise GenealignError(f"{path}: a scratch file ended early while ingesting (disk full?); re-run the ingest.")
            got += more
    finally:
        os.close(fd)
    return window[start - lo: stop - lo]


def staging_bytes(size: int, align: int) -> int:
    """Bytes a `read_range` of `size` bytes may need in its staging buffer."""
    return size + 2 * align

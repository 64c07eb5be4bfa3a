"""Batches for training straight from the store.

The seed's loader built every batch from 64 per-subject `__getitem__` calls, each doing 111 pandas row
look-ups and one npz open. Here a batch is one gather of rows that are already in memory (or, for
cohorts larger than RAM, rows of whole store chunks read ahead by a thread), so the loader is never the
bottleneck of a training step.

Placements (`LoaderConfig.placement`, resolved once in `BatchLoader.__init__`):

- 'device': the split's rows live on the GPU in the store's dtype (float16 halves the memory); a batch
  is an `index_select` there, converted to float32 per batch. Nothing crosses PCIe after start-up.
- 'memory': the rows live in host RAM. On CUDA a batch is gathered into a reusable pinned buffer and
  copied with `non_blocking=True`; a ring of buffers with CUDA events makes sure a buffer is not
  overwritten while its copy is in flight. On a CPU device every batch is a fresh array, so batches
  held by the caller (gradient accumulation) are never overwritten.
- 'stream': for cohorts larger than RAM. A background thread (zarr's reads and numpy's copies release
  the GIL) reads whole chunks, in a shuffled order, into a reused shuffle buffer of
  `shuffle_buffer_chunks` chunks and takes this rank's rows from it; `prefetch` windows wait ready.
- 'auto': 'device' if CUDA and the rows fit in `memory_fraction` of free GPU memory, else 'memory' if
  they fit in `memory_fraction` of available RAM (shared among the node's ranks), else 'stream'.

Order. Epoch e uses a permutation drawn from numpy `default_rng((seed, e))`: the same on every rank and
on every run. Under DDP global step s takes positions [s*B*W, (s+1)*B*W) of that permutation and rank r
takes the r-th slice of B, so ranks see disjoint rows and run the same number of steps. With
`drop_last=True` (the default: a contrastive batch's size is its number of negatives, so every batch
should be full) `steps_per_epoch = n // (B*W)` and the few leftover rows change every epoch. With
`drop_last=False` the last partial global batch is split as evenly as possible among the ranks (sizes
differ by at most one), or dropped if it has fewer rows than ranks.

In 'stream' the permutation is an approximation of a full one (a block shuffle): the chunks are put
in a random order, cut into windows of `shuffle_buffer_chunks` consecutive chunks, and the rows of each
window are permuted. So a batch mixes rows of up to `shuffle_buffer_chunks` chunks rather than the whole
cohort. It is still every row exactly once per epoch, deterministic from (seed, epoch), and sharded like
the others; each rank reads every chunk (the rows of one window are spread over all ranks).

Values are the raw store values as float32: normalisation belongs to the model (`fit_frontend`, which
uses `pipeline.normalize`). Given `covariates` (the store's (N, C) covariate rows, for a model that
residualises them) every batch is a triple (neuro, genes, covariates (B, C) float32) with the same
subjects' covariate rows, whatever the placement; otherwise a pair.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.errors import GenealignError
from pipeline.store import StoreView, gene_shape, read_genes, read_into, row_blocks

PLACEMENTS = ("auto", "device", "memory", "stream")
# Bytes zarr is asked for in one call when loading a split: a few chunks, read concurrently by zarr.
# Larger spans measured slower (fresh large temporaries page-fault), and they cost host memory.
# Pinned host buffers for 'memory' on CUDA: a buffer is reused only after its copy has finished.
PINNED_RING = 3


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 64
    placement: str = "auto"  # 'auto' | 'device' | 'memory' | 'stream'
    seed: int = 42
    drop_last: bool = True
    prefetch: int = 2  # 'stream': windows read ahead by the background thread
    shuffle_buffer_chunks: int = 16  # 'stream': chunks whose rows are shuffled together
    memory_fraction: float = 0.5  # 'auto': share of free GPU memory / available RAM the rows may take


# ---------------------------------------------------------------------------------------------------
# Reading rows from the store


def _check_gene_index(store: StoreView, gene_index: int | None) -> None:
    if gene_index is not None and not 0 <= gene_index < store.n_genes:
        raise GenealignError(
            f"gene_index {gene_index} is out of range for store {store.path} with {store.n_genes} genes; "
            "use store.gene_index(name)."
        )


def read_tensors(store: StoreView, rows, device, gene_index: int | None = None):
    """Rows as float32 tensors on `device`: neuro (n, V) and genes (n, G, D), or (n, D) for one gene.

    For validation and evaluation; reads whole chunks in order, each chunk once."""
    _check_gene_index(store, gene_index)
    neuro, genes = store.read_rows(rows, gene_index, dtype=np.float32)
    device = torch.device(device)
    return torch.from_numpy(neuro).to(device), torch.from_numpy(genes).to(device)


# ---------------------------------------------------------------------------------------------------
# Order and sharding (pure functions of the row count, seed and epoch)


def shard_batches(order: np.ndarray, batch_size: int, world_size: int, rank: int, drop_last: bool) -> list:
    """This rank's batches of a global `order`: global step s is order[s*B*W:(s+1)*B*W], rank r takes
    its r-th B-slice. Every rank gets the same number of batches (see the module docstring)."""
    global_batch = batch_size * world_size
    full = len(order) // global_batch
    starts = [s * global_batch + rank * batch_size for s in range(full)]
    batches = [order[start : start + batch_size] for start in starts]
    rest = order[full * global_batch :]
    if not drop_last and len(rest) >= world_size:
        batches.append(np.array_split(rest, world_size)[rank])
    return batches


def block_shuffle(chunk_of_row: np.ndarray, window_chunks: int, rng: np.random.Generator):
    """The 'stream' order: chunks shuffled, cut into windows of `window_chunks` chunks, rows shuffled
    within each window. Returns (order of positions, window index of each position (n,))."""
    chunks = np.unique(chunk_of_row)
    window_of_chunk = np.empty(int(chunks.max()) + 1 if len(chunks) else 0, dtype=np.int64)
    window_of_chunk[rng.permutation(chunks)] = np.arange(len(chunks)) // window_chunks
    window_of_row = window_of_chunk[chunk_of_row]  # (n,)
    by_window = np.argsort(window_of_row, kind="stable")
    cuts = np.searchsorted(window_of_row[by_window], np.arange(1, int(window_of_row.max(initial=-1)) + 1))
    parts = [rng.permutation(positions) for positions in np.split(by_window, cuts)]
    order = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return order, window_of_row


# ---------------------------------------------------------------------------------------------------
# Placement


def _available_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_placement(placement: str, device: torch.device, nbytes: int, memory_fraction: float) -> str:
    """The concrete placement for `placement` ('auto' picks the first of device, memory, stream that fits)."""
    if placement not in PLACEMENTS:
        raise GenealignError(f"Unknown data placement '{placement}': use one of {', '.join(PLACEMENTS)}.")
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if placement == "device" and not cuda:
        raise GenealignError(
            f"Data placement 'device' needs a CUDA device, but the device is {device}"
            f"{'' if torch.cuda.is_available() else ' and CUDA is not available'}; use 'memory' or 'auto'."
        )
    if placement != "auto":
        return placement
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= memory_fraction * free:
            return "device"
    available = _available_ram_bytes()
    # Each rank of a node holds its own copy in 'memory' placement, so they share the node's RAM.
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if available is not None and nbytes <= memory_fraction * available / local_ranks:
        return "memory"
    return "stream"


class BatchLoader:
    """Shuffled batches of one split for one rank: `for neuro, genes in loader.epoch(e): ...`.

    neuro (B, V) float32 and genes (B, G, D) float32 — or (B, D) when `gene_index` is given, in which
    case only that gene's column is held — on `device`; with `covariates` (N, C) (store rows) also
    their (B, C) rows: `for neuro, genes, covariates in ...`. See the module docstring for the
    placements, the order and the sharding."""

    def __init__(
        self,
        store: StoreView,
        rows,
        config: LoaderConfig,
        device,
        gene_index: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        covariates: np.ndarray | None = None,
    ):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)  # (n,) store rows; positions index into this
        self.config = config
        self.device = torch.device(device)
        self.gene_index = gene_index
        self.rank, self.world_size = int(rank), int(world_size)
        if config.batch_size < 1:
            raise GenealignError(f"batch_size must be >= 1, got {config.batch_size}.")
        if not 0 <= self.rank < self.world_size:
            raise GenealignError(f"rank {rank} is not in [0, world_size={world_size}).")
        if config.shuffle_buffer_chunks < 1 or config.prefetch < 1:
            raise GenealignError("shuffle_buffer_chunks and prefetch must be >= 1.")
        _check_gene_index(store, gene_index)
        n = len(self.rows)
        # (n, C) float32 rows of this loader's subjects: small, so always held, on the device when CUDA.
        self._covariates = None
        if covariates is not None:
            rows_cov = torch.from_numpy(np.ascontiguousarray(np.asarray(covariates, dtype=np.float32)[self.rows]))
            self._covariates = rows_cov.to(self.device) if self.device.type == "cuda" else rows_cov
        global_batch = config.batch_size * self.world_size
        if n < global_batch and config.drop_last:
            raise GenealignError(
                f"{n} rows of store {store.path} make no full batch of {global_batch} "
                f"(batch_size {config.batch_size} x {self.world_size} processes); lower the batch size."
            )
        self.gene_shape = gene_shape(store, gene_index)
        itemsize = np.dtype(store.dtype).itemsize
        self.nbytes = n * (store.neuro_dim + int(np.prod(self.gene_shape))) * itemsize
        self.placement = resolve_placement(config.placement, self.device, self.nbytes, config.memory_fraction)
        self.steps_per_epoch = len(
            shard_batches(np.arange(n), config.batch_size, self.world_size, self.rank, config.drop_last)
        )
        self._neuro = self._genes = None  # 'device' / 'memory': (n, V) and (n, G*D) or (n, D)
        if self.placement == "device":
            self._load_device()
        elif self.placement == "memory":
            self._load_memory()
        else:
            self._chunk_of_row = self.rows // store.chunk_rows  # (n,)

    # -- public ------------------------------------------------------------------------------------

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """Store rows of each of this rank's batches in epoch `epoch`, exactly as `epoch()` yields them."""
        return [self.rows[positions] for positions in self._plan(epoch)[0]]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `steps_per_epoch` batches of epoch `epoch` (a fresh permutation per epoch)."""
        batches, window_of_row = self._plan(epoch)
        if self.placement == "device":
            pairs = self._device_batches(batches)
        elif self.placement == "memory":
            pairs = self._memory_batches(batches)
        else:
            pairs = self._stream_batches(batches, window_of_row)
        return pairs if self._covariates is None else self._with_covariates(pairs, batches)

    def _with_covariates(self, pairs, batches):
        # Every placement yields batch i with the rows of batches[i] in order; the pairs come first in
        # zip so a stream generator is run to its end (and its reader thread stopped).
        for (neuro, genes), positions in zip(pairs, batches):
            index = torch.from_numpy(positions).to(self._covariates.device)
            yield neuro, genes, self._covariates.index_select(0, index)  # (B, C)

    # -- order ---------------------------------------------------------------------------------------

    def _plan(self, epoch: int):
        """(this rank's batches as arrays of positions into `rows`, the stream window of each position
        or None) of one epoch."""
        cfg = self.config
        if cfg.seed < 0 or epoch < 0:
            raise GenealignError(f"seed and epoch must be >= 0 (got seed {cfg.seed}, epoch {epoch}).")
        rng = np.random.default_rng((int(cfg.seed), int(epoch)))
        if self.placement == "stream":
            order, window_of_row = block_shuffle(self._chunk_of_row, cfg.shuffle_buffer_chunks, rng)
        else:
            order, window_of_row = rng.permutation(len(self.rows)), None
        return shard_batches(order, cfg.batch_size, self.world_size, self.rank, cfg.drop_last), window_of_row

    # -- 'device' ------------------------------------------------------------------------------------

    def _load_device(self) -> None:
        dtype = getattr(torch, np.dtype(self.store.dtype).name)
        n = len(self.rows)
        self._neuro = torch.empty((n, self.store.neuro_dim), dtype=dtype, device=self.device)
        self._genes = torch.empty((n, int(np.prod(self.gene_shape))), dtype=dtype, device=self.device)
        # Block by block, so host memory never holds more than one read span.
        for positions, neuro, genes in row_blocks(self.store, self.rows, self.gene_index):
            index = torch.from_numpy(positions).to(self.device)
            self._neuro.index_copy_(0, index, torch.from_numpy(neuro).to(self.device))
            self._genes.index_copy_(0, index, torch.from_numpy(genes.reshape(len(genes), -1)).to(self.device))

    def _device_batches(self, batches):
        if not batches:
            return
        # The epoch's indices cross to the GPU once; batches are slices of them.
        index = torch.from_numpy(np.concatenate(batches)).to(self.device)
        start = 0
        for positions in batches:
            batch_index = index[start : start + len(positions)]
            start += len(positions)
            neuro = self._neuro.index_select(0, batch_index).float()  # (B, V)
            genes = self._genes.index_select(0, batch_index).float()  # (B, G*D) | (B, D)
            yield neuro, genes.view(len(positions), *self.gene_shape)

    # -- 'memory' ------------------------------------------------------------------------------------

    def _load_memory(self) -> None:
        # Pageable, not pinned: batches are gathered on the CPU into small pinned buffers, and only
        # those need pinning for asynchronous copies. (Pinning the whole split would briefly double
        # it in RAM, and torch's pinned allocator rounds sizes up to a power of two.)
        neuro, genes = self.store.read_rows(self.rows, self.gene_index, dtype=self.store.dtype)
        self._neuro, self._genes = neuro, genes.reshape(len(genes), -1)  # (n, V), (n, G*D) | (n, D)

    def _memory_batches(self, batches):
        if self.device.type != "cuda":
            for positions in batches:
                # np.take into a fresh array: faster than torch.index_select on CPU, and never shared
                # with a batch the caller still holds.
                neuro = np.take(self._neuro, positions, axis=0)  # (B, V)
                genes = np.take(self._genes, positions, axis=0)  # (B, G*D) | (B, D)
                yield self._to_float32(neuro, genes)
            return
        b = self.config.batch_size
        dtype = torch.from_numpy(self._neuro[:0]).dtype
        ring = [
            (
                torch.empty((b, self._neuro.shape[1]), dtype=dtype, pin_memory=True),  # (B, V)
                torch.empty((b, self._genes.shape[1]), dtype=dtype, pin_memory=True),  # (B, G*D) | (B, D)
                None,
            )
            for _ in range(PINNED_RING)
        ]
        for step, positions in enumerate(batches):
            slot = step % PINNED_RING
            neuro_buf, genes_buf, copied = ring[slot]
            if copied is not None:
                copied.synchronize()  # the copy that last read this buffer has finished
            m = len(positions)
            # mode="clip" (indices are valid anyway): with the default mode numpy buffers `out`.
            np.take(self._neuro, positions, axis=0, out=neuro_buf.numpy()[:m], mode="clip")
            np.take(self._genes, positions, axis=0, out=genes_buf.numpy()[:m], mode="clip")
            neuro = neuro_buf[:m].to(self.device, non_blocking=True)
            genes = genes_buf[:m].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            ring[slot] = (neuro_buf, genes_buf, event)
            yield neuro.float(), genes.float().view(m, *self.gene_shape)

    def _to_float32(self, neuro: np.ndarray, genes: np.ndarray):
        neuro_t, genes_t = torch.from_numpy(neuro), torch.from_numpy(genes)
        if self.device.type == "cuda":
            neuro_t, genes_t = neuro_t.to(self.device), genes_t.to(self.device)
        return neuro_t.float(), genes_t.float().view(len(genes), *self.gene_shape)

    # -- 'stream' ------------------------------------------------------------------------------------

    def _stream_batches(self, batches, window_of_row):
        """Batches from windows of chunks read ahead by a thread. The thread gathers, per window, the
        rows this rank needs from it, in batch order; this generator cuts them into batches."""
        if not batches:
            return
        wanted = np.concatenate(batches)  # positions in this rank's batch order
        # The global order visits the windows one after another, so this rank's positions are grouped
        # by window, in window order.
        n_windows = int(window_of_row.max()) + 1
        bounds = np.searchsorted(window_of_row[wanted], np.arange(n_windows + 1))
        parts: queue.Queue = queue.Queue(maxsize=self.config.prefetch)
        stop = threading.Event()

        store, c = self.store, self.store.chunk_rows
        window_chunks = self.config.shuffle_buffer_chunks

        def read_windows():
            # Chunks are read into buffers reused from window to window (fresh multi-MB arrays cost
            # page faults); the rows this rank needs are then taken from them in batch order.
            buffer_neuro = np.empty((window_chunks * c, *store.latent_shape), dtype=store.dtype)
            buffer_genes = np.empty((window_chunks * c, *self.gene_shape), dtype=store.dtype)
            try:
                for w in range(n_windows):
                    if stop.is_set():
                        return
                    rows = self.rows[wanted[bounds[w] : bounds[w + 1]]]  # this rank's, in batch order
                    if len(rows) == 0:
                        continue
                    chunks = np.unique(rows // c)
                    for slot, chunk in enumerate(chunks.tolist()):
                        lo, hi = chunk * c, min((chunk + 1) * c, store.n_subjects)
                        at = slice(slot * c, slot * c + hi - lo)
                        read_into(store.neuro, slice(lo, hi), buffer_neuro[at])
                        read_genes(store, slice(lo, hi), self.gene_index, buffer_genes[at])
                    at = np.searchsorted(chunks, rows // c) * c + rows % c  # (m,) buffer row of each row
                    neuro = np.take(buffer_neuro.reshape(len(buffer_neuro), -1), at, axis=0)  # (m, V)
                    genes = np.take(buffer_genes.reshape(len(buffer_genes), -1), at, axis=0)  # (m, G*D) | (m, D)
                    part = (neuro.astype(np.float32, copy=False), genes.astype(np.float32, copy=False))
                    while not stop.is_set():
                        try:
                            parts.put(part, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                parts.put(None)
            except BaseException as exc:  # surfaced in the consumer
                parts.put(exc)

        thread = threading.Thread(target=read_windows, name="genealign-stream", daemon=True)
        thread.start()
        try:
            pending_neuro, pending_genes, pending = [], [], 0
            sizes = iter(len(batch) for batch in batches)
            size = next(sizes)
            while True:
                part = parts.get()
                if isinstance(part, BaseException):
                    raise part
                if part is None:
                    break
                pending_neuro.append(part[0])
                pending_genes.append(part[1])
                pending += len(part[0])
                while size is not None and pending >= size:
                    neuro = np.concatenate(pending_neuro) if len(pending_neuro) > 1 else pending_neuro[0]
                    genes = np.concatenate(pending_genes) if len(pending_genes) > 1 else pending_genes[0]
                    pending_neuro, pending_genes = [neuro[size:]], [genes[size:]]
                    pending -= size
                    yield self._to_float32(neuro[:size], genes[:size])
                    size = next(sizes, None)
        finally:
            stop.set()
            # Unblock a reader waiting on a full queue, then wait for it to leave.
            while thread.is_alive():
                try:
                    parts.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()

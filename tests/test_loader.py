"""BatchLoader order/sharding/values and read_tensors on tiny stores."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipeline.errors import GenealignError
from pipeline.loader import BatchLoader, LoaderConfig, block_shuffle, read_tensors, shard_batches
from pipeline.store import write_store

N, LATENT, G, D = 203, (2, 3, 4), 4, 6
HOST_PLACEMENTS = ["memory", "stream"]


def make_store(path, dtype="float32", n=N, seed=0, chunk_rows=7):
    rng = np.random.default_rng(seed)
    iid = [f"S{i:05d}" for i in range(n)]
    neuro = rng.normal(size=(n, *LATENT)).astype(np.float32)
    genes = rng.normal(size=(n, G, D)).astype(np.float32)
    return write_store(path, iid, neuro, genes, [f"GENE{g}" for g in range(G)], dtype=dtype, chunk_rows=chunk_rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("loader") / "store.zarr")


def loader_for(store, placement, rows=None, **kwargs):
    options = {k: kwargs.pop(k) for k in ("gene_index", "rank", "world_size") if k in kwargs}
    config = LoaderConfig(**{"batch_size": 16, "placement": placement, "shuffle_buffer_chunks": 3, **kwargs})
    rows = store.indices("train") if rows is None else rows
    return BatchLoader(store, rows, config, torch.device("cpu"), **options)


@pytest.mark.parametrize("placement", HOST_PLACEMENTS)
@pytest.mark.parametrize("gene_index", [None, 2])
def test_batches_are_the_store_rows_they_claim(store, placement, gene_index):
    loader = loader_for(store, placement, gene_index=gene_index)
    assert loader.placement == placement
    batches = list(loader.epoch(3))  # held together: a later batch must not overwrite an earlier one
    rows = loader.epoch_rows(3)
    assert len(batches) == len(rows) == loader.steps_per_epoch > 0
    for (neuro, genes), batch_rows in zip(batches, rows):
        want_neuro, want_genes = store.read_rows(batch_rows)
        if gene_index is not None:
            want_genes = want_genes[:, gene_index]
        assert neuro.dtype == genes.dtype == torch.float32
        assert neuro.shape == (16, store.neuro_dim)
        np.testing.assert_array_equal(neuro.numpy(), want_neuro)
        np.testing.assert_array_equal(genes.numpy(), want_genes)


@pytest.mark.parametrize("placement", HOST_PLACEMENTS)
def test_epoch_is_a_permutation_without_drop_last(store, placement):
    train = store.indices("train")
    loader = loader_for(store, placement, drop_last=False)
    batches = list(loader.epoch(1))
    rows = np.concatenate(loader.epoch_rows(1))
    assert sorted(rows.tolist()) == train.tolist()  # every train row exactly once
    assert [len(b[0]) for b in batches] == [16] * (len(train) // 16) + [len(train) % 16]
    # The data too: each yielded neuro row is the store row at the same place of the order.
    neuro = torch.cat([b[0] for b in batches]).numpy()
    np.testing.assert_array_equal(neuro, store.read_rows(rows)[0])


@pytest.mark.parametrize("placement", HOST_PLACEMENTS)
def test_drop_last_gives_full_batches_of_distinct_rows(store, placement):
    train = store.indices("train")
    loader = loader_for(store, placement)
    rows = loader.epoch_rows(0)
    assert loader.steps_per_epoch == len(train) // 16 == len(rows)
    assert all(len(r) == 16 for r in rows)
    flat = np.concatenate(rows)
    assert len(set(flat.tolist())) == len(flat) == len(train) // 16 * 16
    assert set(flat.tolist()) <= set(train.tolist())


@pytest.mark.parametrize("placement", HOST_PLACEMENTS)
def test_order_is_fresh_per_epoch_and_reproducible(store, placement):
    a, b = loader_for(store, placement), loader_for(store, placement)
    epoch1 = np.concatenate(a.epoch_rows(1))
    assert not np.array_equal(epoch1, np.concatenate(a.epoch_rows(2)))
    np.testing.assert_array_equal(epoch1, np.concatenate(b.epoch_rows(1)))
    other_seed = loader_for(store, placement, seed=7)
    assert not np.array_equal(epoch1, np.concatenate(other_seed.epoch_rows(1)))
    # The yielded data follows the same reproducible order.
    first_a = next(iter(a.epoch(1)))[0]
    first_b = next(iter(b.epoch(1)))[0]
    assert torch.equal(first_a, first_b)


@pytest.mark.parametrize("placement", HOST_PLACEMENTS)
@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_ranks_are_disjoint_shards_of_the_global_batches(store, placement, drop_last):
    ranks = [loader_for(store, placement, rank=r, world_size=2, drop_last=drop_last) for r in range(2)]
    whole = loader_for(store, placement, batch_size=32, drop_last=drop_last)  # one process, global batch
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == whole.steps_per_epoch
    rows0, rows1, global_rows = ranks[0].epoch_rows(5), ranks[1].epoch_rows(5), whole.epoch_rows(5)
    assert len(rows0) == len(rows1) == len(global_rows) == ranks[0].steps_per_epoch
    for r0, r1, g in zip(rows0, rows1, global_rows):
        assert not set(r0.tolist()) & set(r1.tolist())
        assert sorted(np.concatenate([r0, r1]).tolist()) == sorted(g.tolist())
        assert abs(len(r0) - len(r1)) <= 1 and len(r0) > 0 and len(r1) > 0
    # The batches each rank yields are its shard's rows.
    for loader, rows in zip(ranks, (rows0, rows1)):
        batches = list(loader.epoch(5))
        assert len(batches) == len(rows)
        for (neuro, _), batch_rows in zip(batches, rows):
            np.testing.assert_array_equal(neuro.numpy(), store.read_rows(batch_rows)[0])


def test_shard_batches_layout():
    order = np.arange(23)
    # Global step s = order[s*8:(s+1)*8]; rank 1 takes the second B=4 slice of it.
    assert [b.tolist() for b in shard_batches(order, 4, 2, 1, True)] == [[4, 5, 6, 7], [12, 13, 14, 15]]
    # Remainder 16..22 (7 rows) split 4/3 among the two ranks.
    tail0 = shard_batches(order, 4, 2, 0, False)[-1].tolist()
    tail1 = shard_batches(order, 4, 2, 1, False)[-1].tolist()
    assert (tail0, tail1) == ([16, 17, 18, 19], [20, 21, 22])
    # A remainder smaller than the number of ranks is dropped, so no rank gets an empty batch.
    assert len(shard_batches(np.arange(17), 4, 2, 0, False)) == 2


def test_block_shuffle_keeps_windows_of_chunks_together():
    chunk_of_row = np.repeat(np.arange(10), 5)  # 10 chunks of 5 rows
    order, window_of_row = block_shuffle(chunk_of_row, 3, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(50))
    windows = window_of_row[order]
    assert np.all(np.diff(windows) >= 0)  # the order visits windows one after another
    assert np.bincount(windows).tolist() == [15, 15, 15, 5]
    for w in range(4):  # a window holds whole chunks
        chunks = set(chunk_of_row[order[windows == w]].tolist())
        assert all(np.sum(chunk_of_row == c) == np.sum(chunk_of_row[order[windows == w]] == c) for c in chunks)


def test_stream_batches_mix_chunks(store):
    loader = loader_for(store, "stream")
    chunks_per_batch = [len(np.unique(rows // store.chunk_rows)) for rows in loader.epoch_rows(0)]
    assert np.mean(chunks_per_batch) > 2  # the shuffle buffer mixes several chunks into each batch


def test_stream_thread_stops_when_the_epoch_is_abandoned(store):
    loader = loader_for(store, "stream", prefetch=1, shuffle_buffer_chunks=1)
    iterator = loader.epoch(0)
    next(iterator)
    iterator.close()
    assert not [t for t in threading.enumerate() if t.name == "genealign-stream"]


@pytest.mark.parametrize("placement", HOST_PLACEMENTS)
def test_float16_store_gives_float32_batches(tmp_path, placement):
    store16 = make_store(tmp_path / "half.zarr", dtype="float16")
    assert store16.dtype == "float16"
    loader = loader_for(store16, placement)
    neuro, genes = next(iter(loader.epoch(0)))
    assert neuro.dtype == genes.dtype == torch.float32
    want_neuro, want_genes = store16.read_rows(loader.epoch_rows(0)[0])
    np.testing.assert_array_equal(neuro.numpy(), want_neuro)
    np.testing.assert_array_equal(genes.numpy(), want_genes)


def test_placement_resolution_and_errors(store):
    assert loader_for(store, "auto").placement == "memory"  # tiny cohort, no CUDA
    assert loader_for(store, "auto", memory_fraction=1e-12).placement == "stream"
    with pytest.raises(GenealignError, match="Unknown data placement"):
        loader_for(store, "gpu")
    if not torch.cuda.is_available():
        with pytest.raises(GenealignError, match="needs a CUDA device"):
            loader_for(store, "device")
    with pytest.raises(GenealignError, match="no full batch"):
        loader_for(store, "memory", batch_size=10_000)
    with pytest.raises(GenealignError, match="gene_index"):
        loader_for(store, "memory", gene_index=G)


def test_read_tensors(store):
    rows = np.array([50, 3, 120, 7, 3])  # unsorted, repeated
    neuro, genes = read_tensors(store, rows, "cpu")
    want_neuro, want_genes = store.read_rows(rows)
    assert neuro.dtype == torch.float32 and genes.shape == (5, G, D)
    np.testing.assert_array_equal(neuro.numpy(), want_neuro)
    np.testing.assert_array_equal(genes.numpy(), want_genes)
    _, one_gene = read_tensors(store, rows, "cpu", gene_index=1)
    np.testing.assert_array_equal(one_gene.numpy(), want_genes[:, 1])


@pytest.mark.parametrize("placement", HOST_PLACEMENTS)
def test_covariates_come_with_the_batch_rows(store, placement):
    # Covariate i encodes store row i, so each batch's covariates must be exactly its rows'.
    covariates = np.stack([np.arange(store.n_subjects), -np.arange(store.n_subjects)], axis=1).astype(np.float32)  # (N, 2)
    config = LoaderConfig(batch_size=16, placement=placement, shuffle_buffer_chunks=3)
    loader = BatchLoader(store, store.indices("train"), config, torch.device("cpu"), covariates=covariates)
    batches = list(loader.epoch(1))
    assert len(batches) == loader.steps_per_epoch > 0
    for (neuro, _, cov), rows in zip(batches, loader.epoch_rows(1)):
        np.testing.assert_array_equal(cov.numpy(), covariates[rows])
        np.testing.assert_array_equal(neuro.numpy(), store.read_rows(rows)[0])
    assert len(next(iter(loader_for(store, placement).epoch(1)))) == 2  # no covariates: pairs, as before

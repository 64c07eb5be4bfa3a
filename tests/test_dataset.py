"""MultiGeneNeuroDataset: the seed's item API over a cached, ingested store."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.dataset import MultiGeneNeuroDataset, cached_store_path, default_cache_dir
from pipeline.errors import GenealignError, GeneNotFoundError
from pipeline.sources import gene_file_name, latent_file_name
from pipeline.store import write_store

LATENT = (2, 3, 4)
D = 8
GENES = ["APOE", "BDNF", "COMT"]
IIDS = [str(1000 + i) for i in range(12)]


def write_sources(root, seed=0):
    """A tiny cohort in the seed's formats; subject 1011 has no latent file, so it is not served."""
    rng = np.random.default_rng(seed)
    gene_dir, latent_dir = root / "genes", root / "latents"
    gene_dir.mkdir(parents=True)
    latent_dir.mkdir(parents=True)
    for iid in IIDS[:-1]:
        np.savez(latent_dir / latent_file_name(iid), latent=rng.normal(size=LATENT).astype(np.float32))
    for gene in GENES:
        df = pd.DataFrame(rng.normal(size=(len(IIDS), D)).astype(np.float32), columns=[f"e{i}" for i in range(D)])
        df.insert(0, "IID", IIDS)
        df.sample(frac=1.0, random_state=1).to_csv(gene_dir / gene_file_name(gene), index=False)
    return gene_dir, latent_dir


def source_values(gene_dir, latent_dir, iid):
    neuro = np.load(latent_dir / latent_file_name(iid))["latent"].reshape(-1)
    genes = []
    for gene in GENES:
        df = pd.read_csv(gene_dir / gene_file_name(gene), dtype={"IID": str}).set_index("IID")
        genes.append(df.loc[iid].to_numpy(np.float32))
    return neuro, np.stack(genes)


@pytest.fixture()
def sources(tmp_path):
    return write_sources(tmp_path / "cohort")


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


def test_sequence_items_match_the_source_files(sources, cache):
    gene_dir, latent_dir = sources
    dataset = MultiGeneNeuroDataset(brain_latent_dir=latent_dir, gene_embedding_dir=gene_dir, gene_embedding_dim=D,
                                    mode="sequence", cache_dir=cache)
    assert len(dataset) == len(IIDS) - 1 and dataset.iids == IIDS[:-1]  # 1011 has no latent
    assert dataset.gene_names == GENES
    for idx in (0, 5, -1):
        item = dataset[idx]
        assert set(item) == {"neuro_embedding", "gene_sequence", "iid", "gene_names"}
        assert item["iid"] == dataset.iids[idx] and item["gene_names"] == GENES
        assert item["neuro_embedding"].dtype == torch.float32 and item["neuro_embedding"].shape == (24,)
        assert item["gene_sequence"].dtype == torch.float32 and item["gene_sequence"].shape == (3, D)
        neuro, genes = source_values(gene_dir, latent_dir, item["iid"])
        np.testing.assert_array_equal(item["neuro_embedding"].numpy(), neuro)
        np.testing.assert_allclose(item["gene_sequence"].numpy(), genes, rtol=1e-6)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_single_mode_and_unknown_gene(sources, cache):
    gene_dir, latent_dir = sources
    dataset = MultiGeneNeuroDataset(latent_dir, gene_dir, mode="single", single_gene_name="BDNF",
                                    gene_embedding_dim=D, cache_dir=cache)
    item = dataset[3]
    assert set(item) == {"neuro_embedding", "gene_embedding", "iid", "gene_name"}
    assert item["gene_name"] == "BDNF" and item["gene_embedding"].shape == (D,)
    assert dataset.gene_names == ["BDNF"]
    _, genes = source_values(gene_dir, latent_dir, item["iid"])
    np.testing.assert_allclose(item["gene_embedding"].numpy(), genes[1], rtol=1e-6)
    with pytest.raises(GeneNotFoundError, match=r"Gene 'APOE4' not found.*Available genes: APOE, BDNF, COMT"):
        MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, mode="single", single_gene_name="APOE4",
                              cache_dir=cache)
    with pytest.raises(ValueError):  # the seed's callers catch ValueError
        MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, mode="single", single_gene_name="XXX",
                              cache_dir=cache)
    with pytest.raises(GenealignError, match="single_gene_name"):
        MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, mode="single", cache_dir=cache)


def test_bad_mode_and_embedding_dim(sources, cache):
    gene_dir, latent_dir = sources
    with pytest.raises(GenealignError, match=f"pass gene_embedding_dim={D}"):
        MultiGeneNeuroDataset(latent_dir, gene_dir, cache_dir=cache)  # the seed's default 256
    with pytest.raises(GenealignError, match="not a mode"):
        MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, mode="pairs", cache_dir=cache)


def test_second_construction_reuses_the_cached_store(sources, cache):
    gene_dir, latent_dir = sources
    first = MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, cache_dir=cache)
    assert first.ingest_result.reused is False
    assert first.store_path == cached_store_path(gene_dir, latent_dir, "IID", cache)
    assert first.store_path.parent == cache and first.store_path.exists()
    stamp = (first.store_path / "zarr.json").stat().st_mtime_ns
    second = MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, cache_dir=cache)
    assert second.ingest_result.reused is True
    assert second.store_path == first.store_path
    assert (second.store_path / "zarr.json").stat().st_mtime_ns == stamp
    assert torch.equal(second[2]["gene_sequence"], first[2]["gene_sequence"])
    # Other sources (or another IID column) get their own cache entry.
    assert cached_store_path(gene_dir, latent_dir, "eid", cache) != first.store_path


def test_changed_sources_are_re_ingested(sources, cache):
    gene_dir, latent_dir = sources
    first = MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, cache_dir=cache)
    iid = first.iids[0]
    new_latent = np.full(LATENT, 7.0, dtype=np.float32)
    np.savez(latent_dir / latent_file_name(iid), latent=new_latent)
    second = MultiGeneNeuroDataset(latent_dir, gene_dir, gene_embedding_dim=D, cache_dir=cache)
    assert second.ingest_result.reused is False
    np.testing.assert_array_equal(second[0]["neuro_embedding"].numpy(), new_latent.reshape(-1))


def test_seed_inference_example_runs_with_the_default_cache(sources, tmp_path, monkeypatch):
    from alignment.model import MultiGeneAlignmentModel

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "genealign"
    gene_dir, latent_dir = sources
    sizes = dict(neuro_input_dim=24, gene_input_dim=D, num_genes=3, projection_dim=16, use_transformer=True,
                 transformer_hidden_dim=16, transformer_num_layers=1, transformer_num_heads=2)
    torch.save({"model_state_dict": MultiGeneAlignmentModel(**sizes).state_dict()}, tmp_path / "best_model.pt")

    # The seed README's "Inference after training", as written apart from the imports and sizes.
    model = MultiGeneAlignmentModel(**sizes)
    checkpoint = torch.load(tmp_path / "best_model.pt")
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    dataset = MultiGeneNeuroDataset(brain_latent_dir=str(latent_dir), gene_embedding_dir=str(gene_dir),
                                    gene_embedding_dim=D, mode="sequence")
    sample = dataset[0]
    neuro_emb = sample["neuro_embedding"].unsqueeze(0)
    gene_seq = sample["gene_sequence"].unsqueeze(0)
    with torch.no_grad():
        neuro_feat = model.encode_neuro(neuro_emb)
        gene_feat = model.encode_gene(gene_seq)
        similarity = (neuro_feat * gene_feat).sum()
    assert neuro_emb.shape == (1, 24) and gene_seq.shape == (1, 3, D)
    assert neuro_feat.shape == gene_feat.shape == (1, 16) and torch.isfinite(similarity)
    assert dataset.store_path.parent == tmp_path / "xdg" / "genealign"  # the default cache location


def test_from_store_and_split(tmp_path):
    rng = np.random.default_rng(3)
    n = 40
    iid = [f"S{i:03d}" for i in range(n)]
    neuro = rng.normal(size=(n, *LATENT)).astype(np.float32)
    genes = rng.normal(size=(n, 3, D)).astype(np.float32)
    store = write_store(tmp_path / "s.zarr", iid, neuro, genes, GENES, dtype="float16")
    dataset = MultiGeneNeuroDataset.from_store(tmp_path / "s.zarr")
    assert dataset.ingest_result is None and len(dataset) == n and dataset.gene_names == GENES
    item = dataset[7]
    assert item["iid"] == "S007" and item["neuro_embedding"].dtype == torch.float32
    np.testing.assert_array_equal(item["gene_sequence"].numpy(), genes[7].astype(np.float16).astype(np.float32))
    single = MultiGeneNeuroDataset.from_store(tmp_path / "s.zarr", mode="single", single_gene_name="COMT")
    want = genes[7, 2].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(single[7]["gene_embedding"].numpy(), want)
    with pytest.raises(GeneNotFoundError, match="Gene 'XXX' not found"):
        MultiGeneNeuroDataset.from_store(tmp_path / "s.zarr", mode="single", single_gene_name="XXX")
    test = MultiGeneNeuroDataset.from_store(tmp_path / "s.zarr", split="test")
    assert test.iids == [str(i) for i in store.iid[store.indices("test")]]
    # Picklable for DataLoader workers started with 'spawn'.
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[3]["neuro_embedding"], dataset[3]["neuro_embedding"])


def test_get_all_gene_names(sources):
    gene_dir, _ = sources
    assert MultiGeneNeuroDataset.get_all_gene_names(gene_dir) == GENES


def test_seed_style_imports():
    from alignment import MultiGeneAlignmentModel as Model
    from pipeline import MultiGeneNeuroDataset as Dataset

    assert Dataset is MultiGeneNeuroDataset and Model.__name__ == "MultiGeneAlignmentModel"

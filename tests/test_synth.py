"""pipeline.synth: file formats, determinism, realism options, planted signal, interaction, oracle."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import synth
from pipeline.errors import GenealignError
from pipeline.sources import GENE_FILE_SUFFIX, LATENT_FILE_SUFFIX, gene_file_name, latent_file_name
from pipeline.synth import (
    GENE_SYMBOLS,
    SynthConfig,
    causal_genes,
    gene_information,
    load_truth,
    oracle_embeddings,
    oracle_retrieval,
    strongest_gene,
    synthesize,
)

TINY = dict(subjects=400, genes=16, embedding_dim=16, latent_shape=(2, 5, 6, 5), seed=3)


@pytest.fixture(scope="module")
def signal_cohort(tmp_path_factory):
    return synthesize(SynthConfig(out_dir=tmp_path_factory.mktemp("signal"), **TINY))


@pytest.fixture(scope="module")
def null_cohort(tmp_path_factory):
    return synthesize(SynthConfig(out_dir=tmp_path_factory.mktemp("null"), null=True, **TINY))


def read_cohort(result):
    """(truth, gene_names, iids, genes (N, G, D), neuro (N, V)) of the subjects with every file,
    read the way a user would: pandas for the CSVs, np.load for the latents."""
    truth = load_truth(result.truth_path)
    names = truth["gene_names"]
    frames = [
        pd.read_csv(result.gene_embedding_dir / gene_file_name(g), dtype={"IID": str}).set_index("IID") for g in names
    ]
    latents = {p.name[: -len(LATENT_FILE_SUFFIX)]: p for p in result.brain_latent_dir.glob(f"*{LATENT_FILE_SUFFIX}")}
    iids = sorted(set(latents).intersection(*[set(f.index) for f in frames]))
    genes = np.stack([f.loc[iids].to_numpy(np.float32) for f in frames], axis=1)
    neuro = np.stack([np.load(latents[i])["latent"].reshape(-1) for i in iids])
    return truth, names, iids, genes, neuro


def cv_r2(x, y, ridge, folds=5):
    """Cross-validated R^2 per column of y of a ridge regression on x (penalty ridge * n)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64).reshape(len(x), -1)
    fold = np.arange(len(x)) % folds
    ss_res, ss_tot = 0.0, 0.0
    for f in range(folds):
        test, train = fold == f, fold != f
        mx, my = x[train].mean(0), y[train].mean(0)
        xt = x[train] - mx
        w = np.linalg.solve(xt.T @ xt + ridge * len(xt) * np.eye(x.shape[1]), xt.T @ (y[train] - my))
        ss_res = ss_res + (((x[test] - mx) @ w + my - y[test]) ** 2).sum(0)
        ss_tot = ss_tot + ((y[test] - my) ** 2).sum(0)
    return 1.0 - ss_res / ss_tot


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- formats
def test_gene_symbols_are_unique_and_enough():
    assert len(GENE_SYMBOLS) >= 111 and len(set(GENE_SYMBOLS)) == len(GENE_SYMBOLS)
    assert {"APOE", "BDNF", "COMT", "APP", "MAPT", "TREM2", "SNCA", "DRD2", "SHANK3"} <= set(GENE_SYMBOLS[:111])


def test_files_names_columns_keys_dtypes_shapes(signal_cohort):
    res = signal_cohort
    truth = load_truth(res.truth_path)
    assert res.truth_path == res.out_dir / "truth.json" and res.n_subjects == 400 and res.n_genes == 16
    names = list(GENE_SYMBOLS[:16])
    assert truth["gene_names"] == names
    assert sorted(p.name for p in res.gene_embedding_dir.iterdir()) == sorted(gene_file_name(g) for g in names)
    for g in names:
        df = pd.read_csv(res.gene_embedding_dir / gene_file_name(g), dtype={"IID": str})
        assert list(df.columns) == ["IID"] + [f"emb_{d}" for d in range(16)]
        assert df.iloc[:, 1:].dtypes.map(lambda t: t.kind == "f").all()
        assert df["IID"].str.fullmatch(r"[1-5]\d{6}").all() and df["IID"].is_unique
        assert len(df) == 400 - list(truth["missing_gene_row"].values()).count(g)
    files = sorted(res.brain_latent_dir.iterdir())
    assert len(files) == 400 - len(truth["missing_latent"]) == 396
    for path in files[:5]:
        assert path.name.endswith(LATENT_FILE_SUFFIX)
        with np.load(path) as npz:
            assert list(npz.keys()) == ["latent"]
            assert npz["latent"].dtype == np.float32 and npz["latent"].shape == (2, 5, 6, 5)
            assert np.isfinite(npz["latent"]).all()


def test_csv_reads_back_exactly_the_source_values(signal_cohort):
    """pandas -> float32 gives exactly quantize(generator values): the ingest round-trip contract."""
    truth = load_truth(signal_cohort.truth_path)
    model = synth._model_from_truth(truth)
    subjects = synth._draw_subjects(model)
    position = {str(iid): i for i, iid in enumerate(subjects.iid)}
    for j in (0, 7):
        values = synth.quantize(synth._gene_values(model, subjects, j), truth["csv_decimals"])
        df = pd.read_csv(signal_cohort.gene_embedding_dir / gene_file_name(truth["gene_names"][j]), dtype={"IID": str})
        rows = [position[i] for i in df["IID"]]
        assert np.array_equal(df.iloc[:, 1:].to_numpy(np.float64).astype(np.float32), values[rows])
        as32 = pd.read_csv(signal_cohort.gene_embedding_dir / gene_file_name(truth["gene_names"][j]),
                           dtype={"IID": str, **{f"emb_{d}": np.float32 for d in range(16)}})
        assert np.array_equal(as32.iloc[:, 1:].to_numpy(), values[rows])


def test_vectorised_writer_matches_python_formatting(tmp_path):
    values = np.array([[0.0, -0.0000049, -0.00001, 98.999994, -98.999994, 0.5, 1e-6, 12.3456789, -3.000005]])
    values = np.concatenate([values, np.random.default_rng(0).normal(0, 3, (40, values.shape[1]))])
    iid = np.arange(1000000, 1000000 + len(values))
    path = tmp_path / "x.csv"
    synth.write_gene_csv(path, iid, values, decimals=5)
    lines = path.read_text().splitlines()
    assert lines[0] == "IID," + ",".join(f"emb_{d}" for d in range(values.shape[1]))
    q = np.rint(values * 1e5).astype(np.int64)
    for line, row_iid, row in zip(lines[1:], iid, q):
        expected = [f"{'-' if n < 0 else ''}{abs(n) // 100000}.{abs(n) % 100000:05d}" for n in row]
        assert line == ",".join([str(row_iid)] + expected)
    parsed = pd.read_csv(path).iloc[:, 1:].to_numpy(np.float64).astype(np.float32)
    assert np.array_equal(parsed, synth.quantize(values, 5))


# ------------------------------------------------------------------------------ determinism, realism
def test_same_seed_same_bytes_different_seed_different(tmp_path):
    small = dict(TINY, subjects=60, genes=6)
    a = synthesize(SynthConfig(out_dir=tmp_path / "a", **small))
    b = synthesize(SynthConfig(out_dir=tmp_path / "b", **small))
    c = synthesize(SynthConfig(out_dir=tmp_path / "c", **dict(small, seed=4)))
    assert digest(a.out_dir) == digest(b.out_dir)
    da, dc = digest(a.out_dir), digest(c.out_dir)
    assert da["gene_embeddings/APOE" + GENE_FILE_SUFFIX] != dc["gene_embeddings/APOE" + GENE_FILE_SUFFIX]
    assert {p.name for p in a.brain_latent_dir.iterdir()} != {p.name for p in c.brain_latent_dir.iterdir()}


def test_missing_files_recorded_and_rows_shuffled(signal_cohort):
    res = signal_cohort
    truth = load_truth(res.truth_path)
    missing_latent, missing_row = truth["missing_latent"], truth["missing_gene_row"]
    assert len(missing_latent) == 4 and len(missing_row) == 2  # 1% and 0.5% of 400
    assert not set(missing_latent) & set(missing_row)
    assert truth["n_complete"] == 400 - 4 - 2
    for iid in missing_latent:
        assert not (res.brain_latent_dir / latent_file_name(iid)).exists()
    order = {}
    for g in truth["gene_names"]:
        order[g] = pd.read_csv(res.gene_embedding_dir / gene_file_name(g), dtype={"IID": str})["IID"].tolist()
    all_iids = set(order[truth["gene_names"][0]]) | set(missing_row)
    assert len(all_iids) == 400
    for iid, gene in missing_row.items():
        assert iid not in order[gene] and all(iid in order[g] for g in order if g != gene)
        assert (res.brain_latent_dir / latent_file_name(iid)).exists()
    first, second = (order[g] for g in truth["gene_names"][:2])
    common = [i for i in first if i in set(second)]
    assert common != [i for i in second if i in set(first)]  # different row order in different CSVs
    assert first != sorted(first)
    _, _, iids, genes, neuro = read_cohort(res)
    assert len(iids) == truth["n_complete"] == genes.shape[0] == neuro.shape[0]


def test_unshuffled_rows_are_sorted_and_rerun_replaces_old_files(tmp_path):
    out = tmp_path / "cohort"
    synthesize(SynthConfig(out_dir=out, **dict(TINY, subjects=50, genes=8)))
    res = synthesize(SynthConfig(out_dir=out, shuffle_rows=False, missing_latent_frac=0.0,
                                 missing_gene_row_frac=0.0, **dict(TINY, subjects=30, genes=5)))
    assert len(list(res.gene_embedding_dir.iterdir())) == 5 and len(list(res.brain_latent_dir.iterdir())) == 30
    iids = pd.read_csv(res.gene_embedding_dir / gene_file_name("APOE"), dtype={"IID": str})["IID"].tolist()
    assert iids == sorted(iids) and len(iids) == 30
    assert not list(out.glob(".*partial")) and not list(out.glob(".*previous"))


def test_invalid_configs_raise_genealign_error(tmp_path):
    with pytest.raises(GenealignError, match="genes"):
        synthesize(SynthConfig(out_dir=tmp_path, **dict(TINY, genes=len(GENE_SYMBOLS) + 1)))
    with pytest.raises(GenealignError, match="subjects"):
        synthesize(SynthConfig(out_dir=tmp_path, **dict(TINY, subjects=1)))
    with pytest.raises(GenealignError, match="missing"):
        synthesize(SynthConfig(out_dir=tmp_path, missing_latent_frac=1.5, **TINY))
    with pytest.raises(GenealignError):
        load_truth(tmp_path / "nothing.json")


# ------------------------------------------------------------------------------------ planted truth
def test_truth_names_causal_genes_and_interaction(signal_cohort, null_cohort):
    truth, null_truth = load_truth(signal_cohort.truth_path), load_truth(null_cohort.truth_path)
    causal = causal_genes(truth)
    assert len(causal) == 3 and max(causal.values()) == 1.0
    assert list(causal.values()) == sorted(causal.values(), reverse=True)
    pair = truth["interaction"]["genes"]
    assert len(pair) == 2 and not set(pair) & set(causal) and not set(pair) & set(truth["noise_genes"])
    assert set(truth["noise_genes"]) | set(causal) | set(pair) == set(truth["gene_names"])
    assert truth["config"]["seed"] == 3 and truth["config"]["latent_shape"] == [2, 5, 6, 5]
    assert causal_genes(null_truth) == {} and null_truth["null"] is True
    assert strongest_gene(null_truth) == strongest_gene(truth)  # same planted structure, no effect


def test_strongest_gene_is_the_one_that_retrieves_best_alone(signal_cohort, null_cohort):
    truth, names, _, genes, neuro = read_cohort(signal_cohort)
    info = gene_information(truth)
    assert set(info) == set(causal_genes(truth)) and all(v > 0 for v in info.values())
    mean_rank = {}  # the oracle's mean rank of the true match, gene -> brain, from that gene alone
    for g in info:
        j = names.index(g)
        gene_side, neuro_side = oracle_embeddings(truth, [g], genes[:, [j]], neuro)
        score = gene_side @ neuro_side.T
        mean_rank[g] = float(np.mean((score > np.diag(score)[:, None]).sum(1)))
    # More information, better retrieval; here the largest strength is not the most informative gene.
    assert sorted(info, key=info.get) == sorted(mean_rank, key=mean_rank.get, reverse=True), (info, mean_rank)
    causal = causal_genes(truth)
    assert strongest_gene(truth) == max(info, key=info.get) != max(causal, key=causal.get)
    assert strongest_gene(load_truth(null_cohort.truth_path)) == strongest_gene(truth)


def probe_scores(truth, names, genes, neuro):
    """Per gene: summed cross-validated R^2 of a ridge from its embedding to the top 20 neuro PCs."""
    z = (neuro - neuro.mean(0)) / neuro.std(0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    pcs = u[:, :20] * s[:20]
    return {g: float(np.clip(cv_r2(genes[:, j], pcs, 0.1), 0, None).sum()) for j, g in enumerate(names)}


def test_linear_probe_finds_causal_genes_and_null_has_none(signal_cohort, null_cohort):
    truth, names, _, genes, neuro = read_cohort(signal_cohort)
    scores = probe_scores(truth, names, genes, neuro)
    causal = causal_genes(truth)
    noise_max = max(scores[g] for g in truth["noise_genes"])
    assert min(scores[g] for g in causal) > 3 * noise_max + 0.05, scores
    null_truth, null_names, _, null_genes, null_neuro = read_cohort(null_cohort)
    null_scores = probe_scores(null_truth, null_names, null_genes, null_neuro)
    assert max(null_scores.values()) < min(scores[g] for g in causal) / 3, null_scores


def test_interaction_needs_both_genes(signal_cohort, null_cohort):
    """The u*w component: no linear signal in gene a, gene b or both; their product features predict it."""

    def interaction_r2(result):
        truth, names, _, genes, neuro = read_cohort(result)
        observed, _ = synth._observed_coefficients(synth._model_from_truth(truth), neuro)
        target = observed[:, truth["interaction"]["component"]]
        a, b = (genes[:, names.index(g)] for g in truth["interaction"]["genes"])

        def top_pcs(x, k=3):
            u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
            return u[:, :k] * s[:k]

        product = (top_pcs(a)[:, :, None] * top_pcs(b)[:, None, :]).reshape(len(a), -1)  # (N, 9)
        return [float(cv_r2(x, target, 0.01)[0]) for x in (a, b, np.concatenate([a, b], 1), product)]

    r2_a, r2_b, r2_ab, r2_product = interaction_r2(signal_cohort)
    assert max(r2_a, r2_b, r2_ab) < 0.05 and r2_product > 0.3, (r2_a, r2_b, r2_ab, r2_product)
    assert interaction_r2(null_cohort)[3] < 0.05


# ------------------------------------------------------------------------------------------ oracle
def test_oracle_far_above_chance_on_signal_and_at_chance_on_null(signal_cohort, null_cohort):
    truth, names, _, genes, neuro = read_cohort(signal_cohort)
    result = oracle_retrieval(truth, names, genes, neuro, pool=1000)
    assert result["pool_size"] == len(genes) and result["chance_top1"] == 1 / len(genes)
    assert result["gene_to_brain_top1"] > 0.3 and result["brain_to_gene_top1"] > 0.3, result
    null_truth, null_names, _, null_genes, null_neuro = read_cohort(null_cohort)
    null = oracle_retrieval(null_truth, null_names, null_genes, null_neuro, pool=1000)
    assert null["mean_top1"] < 0.02, null


def test_oracle_embeddings_score_subset_float16_and_order(signal_cohort):
    truth, names, _, genes, neuro = read_cohort(signal_cohort)
    gene_side, neuro_side = oracle_embeddings(truth, names, genes, neuro)
    assert gene_side.shape == neuro_side.shape and gene_side.shape[0] == len(genes) and gene_side.dtype == np.float64
    score = gene_side @ neuro_side.T
    full = np.mean(score.argmax(1) == np.arange(len(genes)))
    # any order and subset of genes (store order), float16-rounded values: still works, never better
    keep = list(causal_genes(truth)) + truth["interaction"]["genes"]
    idx = [names.index(g) for g in reversed(keep)]
    sub_gene, sub_neuro = oracle_embeddings(truth, [names[i] for i in idx], genes[:, idx].astype(np.float16), neuro)
    subset = np.mean((sub_gene @ sub_neuro.T).argmax(1) == np.arange(len(genes)))
    assert 0.3 < subset <= full + 0.02, (subset, full)
    one = [names.index(strongest_gene(truth))]
    single = oracle_retrieval(truth, [names[i] for i in one], genes[:, one], neuro)
    assert 1 / len(genes) < single["mean_top1"] < subset
    with pytest.raises(GenealignError, match="NOTAGENE"):
        oracle_embeddings(truth, ["NOTAGENE"], genes[:, :1], neuro)
    with pytest.raises(GenealignError, match="shape"):
        oracle_embeddings(truth, names, genes[:, :, :8], neuro)

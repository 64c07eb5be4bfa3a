"""pipeline.synth: file formats, determinism, realism options, planted signal, interaction, oracle."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import oracle, synth, synth_output
from pipeline.errors import GenealignError
from pipeline.oracle import gene_information, oracle_embeddings, strongest_gene
from pipeline.sources import GENE_FILE_SUFFIX, LATENT_FILE_SUFFIX, gene_file_name, latent_file_name
from pipeline.synth import (
    GENE_SYMBOLS,
    SynthConfig,
    causal_genes,
    load_truth,
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


def quantize(values, decimals):
    """The float32 a CSV reader gets back from what the writer writes with `decimals` fixed decimals."""
    return (np.rint(np.asarray(values, np.float64) * 10**decimals) / 10**decimals).astype(np.float32)


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
    model = oracle._model_from_truth(truth)
    subjects = synth._draw_subjects(model)
    position = {str(iid): i for i, iid in enumerate(subjects.iid)}
    for j in (0, 7):
        values = quantize(synth._gene_values(model, subjects, j), truth["csv_decimals"])
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
    synth_output.write_gene_csv(path, iid, values, decimals=5)
    lines = path.read_text().splitlines()
    assert lines[0] == "IID," + ",".join(f"emb_{d}" for d in range(values.shape[1]))
    q = np.rint(values * 1e5).astype(np.int64)
    for line, row_iid, row in zip(lines[1:], iid, q):
        expected = [f"{'-' if n < 0 else ''}{abs(n) // 100000}.{abs(n) % 100000:05d}" for n in row]
        assert line == ",".join([str(row_iid)] + expected)
    parsed = pd.read_csv(path).iloc[:, 1:].to_numpy(np.float64).astype(np.float32)
    assert np.array_equal(parsed, quantize(values, 5))


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
    other = SynthConfig(out_dir=out, shuffle_rows=False, missing_latent_frac=0.0, missing_gene_row_frac=0.0,
                        **dict(TINY, subjects=30, genes=5))
    with pytest.raises(GenealignError, match="other settings.*--overwrite"):
        synthesize(other)
    assert len(list((out / "gene_embeddings").iterdir())) == 8  # refused: nothing replaced
    res = synthesize(other, overwrite=True)
    assert len(list(res.gene_embedding_dir.iterdir())) == 5 and len(list(res.brain_latent_dir.iterdir())) == 30
    iids = pd.read_csv(res.gene_embedding_dir / gene_file_name("APOE"), dtype={"IID": str})["IID"].tolist()
    assert iids == sorted(iids) and len(iids) == 30
    assert not list(out.glob(".*partial")) and not list(out.glob(".*previous"))


# ------------------------------------------------------------------------------ whose files these are
def test_foreign_files_survive_synth_with_and_without_overwrite(tmp_path):
    small = SynthConfig(out_dir=tmp_path / "cohort", **dict(TINY, subjects=30, genes=3))
    foreign = tmp_path / "cohort" / "brain_latent" / "9999999_latent.npz"
    foreign.parent.mkdir(parents=True)
    np.savez(foreign, latent=np.ones(3, np.float32))
    for overwrite in (False, True):
        with pytest.raises(GenealignError, match="9999999_latent.npz was not written by genealign synth"):
            synthesize(small, overwrite=overwrite)
    assert sorted(p.name for p in (tmp_path / "cohort").rglob("*")) == ["9999999_latent.npz", "brain_latent"]
    foreign.unlink()
    first = synthesize(small)
    before = digest(first.out_dir)
    again = synthesize(small)  # its own output, same settings: written again, same bytes
    assert digest(again.out_dir) == before
    readme = first.out_dir / "README"
    readme.write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(GenealignError, match="README was not written by genealign synth"):
            synthesize(SynthConfig(**{**small.__dict__, "seed": 9}), overwrite=overwrite)
    assert readme.read_text() == "my notes"
    assert {k: v for k, v in digest(first.out_dir).items() if k != "README"} == before  # nothing touched


def test_interrupted_run_is_recognised_and_cleaned(tmp_path):
    small = SynthConfig(out_dir=tmp_path / "cohort", **dict(TINY, subjects=30, genes=3))
    result = synthesize(small)
    (result.out_dir / ".gene_embeddings.x1.partial").mkdir()  # left by a run that died
    (result.out_dir / ".truth.json.x2.tmp").write_text("{")
    (result.out_dir / "truth.json").unlink()
    synthesize(small)
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        ".genealign-synth.json", "brain_latent", "gene_embeddings", "truth.json"]


def test_synth_cli_flags_and_foreign_files(tmp_path):
    from typer.testing import CliRunner

    from alignment.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["synth", str(tmp_path / "c"), "--subjects", "30", "--genes", "3",
                                        "--embedding_dim", "4", "--latent_shape", "2,4,4,4", *args])

    assert run("--null").exit_code == 0 and load_truth(tmp_path / "c")["null"] is True
    assert run("--null").exit_code == 0  # re-run on its own output
    result = run("--no-null")
    assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output
    assert run("--no-null", "--overwrite").exit_code == 0 and load_truth(tmp_path / "c")["null"] is False
    mine = tmp_path / "c" / "gene_embeddings" / "MYGENE_brain_gene_embeddingUKB.csv"
    mine.write_text("IID,emb_0\n1,0.5\n")
    result = run("--overwrite")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "MYGENE_brain_gene_embeddingUKB.csv was not written by genealign synth" in text
    assert mine.read_text() == "IID,emb_0\n1,0.5\n"


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
        observed, _ = oracle._observed_coefficients(oracle._model_from_truth(truth), neuro)
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
def oracle_top1(truth, names, genes, neuro) -> tuple[float, float]:
    """The oracle's top-1 (gene -> brain, brain -> gene) over the whole cohort; ties count as misses."""
    gene_side, neuro_side = oracle_embeddings(truth, names, genes, neuro)
    score = gene_side @ neuro_side.T  # (n, n): row = gene query, column = neuro candidate
    diag, off = np.diag(score), score.copy()
    np.fill_diagonal(off, -np.inf)
    return float(np.mean(diag > off.max(axis=1))), float(np.mean(diag > off.max(axis=0)))


def test_oracle_far_above_chance_on_signal_and_at_chance_on_null(signal_cohort, null_cohort):
    truth, names, _, genes, neuro = read_cohort(signal_cohort)
    g2b, b2g = oracle_top1(truth, names, genes, neuro)
    assert g2b > 0.3 and b2g > 0.3, (g2b, b2g)
    null_truth, null_names, _, null_genes, null_neuro = read_cohort(null_cohort)
    assert np.mean(oracle_top1(null_truth, null_names, null_genes, null_neuro)) < 0.02


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
    single = np.mean(oracle_top1(truth, [names[i] for i in one], genes[:, one], neuro))
    assert 1 / len(genes) < single < subset
    with pytest.raises(GenealignError, match="NOTAGENE"):
        oracle_embeddings(truth, ["NOTAGENE"], genes[:, :1], neuro)
    with pytest.raises(GenealignError, match="shape"):
        oracle_embeddings(truth, names, genes[:, :, :8], neuro)


# --------------------------------------------------------------------------------- confounds, families
def read_covariates(result):
    return pd.read_csv(result.out_dir / "covariates.csv", dtype={"IID": str}).set_index("IID")


@pytest.fixture(scope="module")
def confounded_cohort(tmp_path_factory):
    """300 subjects x 74 genes (HTR2C, MAOA, MAOB are X-linked) x 4 dims, half of them in families."""
    config = dict(TINY, subjects=300, genes=74, embedding_dim=4, latent_shape=(2, 4, 4, 4))
    return synthesize(SynthConfig(out_dir=tmp_path_factory.mktemp("confounded"), confounds=True, families=0.5, **config))


def test_covariates_and_kinship_files(confounded_cohort):
    res = confounded_cohort
    truth = load_truth(res.truth_path)
    cov = read_covariates(res)
    assert list(cov.columns) == ["age", "sex", "site", "head_size"] + [f"PC{k}" for k in range(1, 11)]
    assert len(cov) == 300 and cov.index.is_unique and cov.index.str.fullmatch(r"[1-5]\d{6}").all()
    assert set(cov["sex"]) == {0, 1} and cov["site"].str.fullmatch(r"site_[1-4]").all()
    assert cov["age"].between(45, 82).all() and np.isfinite(cov.filter(like="PC").to_numpy()).all()
    assert cov[cov["sex"] == 1]["head_size"].mean() > cov[cov["sex"] == 0]["head_size"].mean()
    kin = pd.read_csv(res.out_dir / "kinship.dat", sep=r"\s+", dtype={"ID1": str, "ID2": str})
    assert list(kin.columns) == ["ID1", "ID2", "HetHet", "IBS0", "Kinship"]
    families = truth["families"]
    assert families["n_related_subjects"] == 150 and len(kin) == families["n_pairs"] > 0
    assert kin["Kinship"].between(0.177, 0.354).all() and abs(kin["Kinship"].mean() - 0.25) < 0.02
    assert (kin["IBS0"] < 0.01).all() and (kin["ID1"] < kin["ID2"]).all()
    member_of = {iid: f for f, members in enumerate(families["members"]) for iid in members}
    assert all(member_of[a] == member_of[b] for a, b in zip(kin["ID1"], kin["ID2"]))
    assert truth["confounds"]["x_linked_genes"] == ["HTR2C", "MAOA", "MAOB"]
    assert truth["config"]["confounds"] is True and truth["config"]["families"] == 0.5


def test_siblings_share_half_their_genetic_factors(confounded_cohort):
    truth = load_truth(confounded_cohort.truth_path)
    model = oracle._model_from_truth(truth)
    subjects = synth._draw_subjects(model)
    pairs = np.array([(m[0], m[1]) for m in subjects.families])
    z = subjects.latent[:, : model.spec.n_factors]  # (N, K)
    sibling_r = np.mean([np.corrcoef(z[pairs[:, 0], k], z[pairs[:, 1], k])[0, 1] for k in range(z.shape[1])])
    others = np.random.default_rng(0).permutation(len(z))[: len(pairs)]
    unrelated_r = np.mean([np.corrcoef(z[pairs[:, 0], k], z[others, k])[0, 1] for k in range(z.shape[1])])
    assert 0.35 < sibling_r < 0.65 and abs(unrelated_r) < 0.15, (sibling_r, unrelated_r)
    assert np.isclose(z.std(), 1.0, atol=0.05)  # marginals unchanged


def test_sex_shows_in_x_linked_genes_and_confounds_refuse_the_oracle(confounded_cohort):
    truth, names, iids, genes, neuro = read_cohort(confounded_cohort)
    sex = read_covariates(confounded_cohort).loc[iids, "sex"].to_numpy(float)
    r2 = {g: float(cv_r2(genes[:, names.index(g)], sex, 0.01)[0]) for g in ("MAOA", "HTR2C", "APOE", "BDNF")}
    assert min(r2["MAOA"], r2["HTR2C"]) > 0.6 and max(r2["APOE"], r2["BDNF"]) < 0.2, r2
    assert oracle.oracle_refusal(truth) and "confounds" in oracle.oracle_refusal(truth)
    with pytest.raises(GenealignError, match="--confounds"):
        oracle_embeddings(truth, names, genes, neuro)


def test_flags_draw_from_their_own_streams(tmp_path):
    """Families change only their members' rows; without the flags nothing is added to the output."""
    small = dict(TINY, subjects=60, genes=3, shuffle_rows=False)
    plain = synthesize(SynthConfig(out_dir=tmp_path / "plain", **small))
    related = synthesize(SynthConfig(out_dir=tmp_path / "related", families=0.3, **small))
    assert sorted(p.name for p in plain.out_dir.iterdir()) == [
        ".genealign-synth.json", "brain_latent", "gene_embeddings", "truth.json"]
    truth = load_truth(plain.truth_path)
    assert "confounds" not in truth["config"] and "families" not in truth and "confounds" not in truth
    members = {iid for family in load_truth(related.truth_path)["families"]["members"] for iid in family}
    name = gene_file_name("APOE")
    rows = [(plain.gene_embedding_dir / name).read_text().splitlines(),
            (related.gene_embedding_dir / name).read_text().splitlines()]
    for a, b in zip(*rows):
        assert (a == b) != (a.split(",")[0] in members), a  # identical exactly for the unrelated
    again = synthesize(SynthConfig(out_dir=tmp_path / "again", families=0.3, confounds=True, **small))
    same = synthesize(SynthConfig(out_dir=tmp_path / "same", families=0.3, confounds=True, **small))
    assert digest(again.out_dir) == digest(same.out_dir)


def _pca(x, k):
    """z-score + top-k principal axes of x (n, f), fitted on x; returns the projection function."""
    mean, sd = x.mean(0), x.std(0) + 1e-12
    _, vectors = np.linalg.eigh(((x - mean) / sd).T @ ((x - mean) / sd))
    top = vectors[:, ::-1][:, :k]
    return lambda y: ((y - mean) / sd) @ top


def _covariate_design(cov):
    age = (cov["age"].to_numpy() - 64) / 7.5
    sites = pd.get_dummies(cov["site"]).to_numpy(float)[:, 1:]
    return np.column_stack([np.ones(len(cov)), age, age**2, cov["sex"], cov["head_size"], sites, cov.filter(like="PC")])


def cca_top1(genes, neuro, cov, residualise, n_test=1000, pool=100, permutations=1000, seed=0):
    """(top-1 gene -> brain, permutation p) of PCA-20 + CCA-4 fitted on the train part, over held-out
    pools of `pool`; `residualise`: covariates regressed out of both modalities by OLS on train."""
    from sklearn.cross_decomposition import CCA

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(genes))
    train, test = order[:-n_test], order[-n_test:]
    if residualise:
        design = _covariate_design(cov)
        genes, neuro = (x - design @ np.linalg.lstsq(design[train], x[train], rcond=None)[0] for x in (genes, neuro))
    to_g, to_b = _pca(genes[train], 20), _pca(neuro[train], 20)
    cca = CCA(n_components=4, max_iter=1000).fit(to_g(genes[train]), to_b(neuro[train]))
    g, b = cca.transform(to_g(genes[test]), to_b(neuro[test]))
    g, b = g / np.linalg.norm(g, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    pools = np.arange(n_test).reshape(-1, pool)
    best = np.concatenate([(g[p] @ b[p].T).argmax(1) for p in pools])  # (n_test,) position in its pool
    top1 = float(np.mean(best == np.tile(np.arange(pool), len(pools))))
    shuffled = [np.mean(best == np.concatenate([rng.permutation(pool) for _ in pools])) for _ in range(permutations)]
    return top1, (1 + int(np.sum(np.array(shuffled) >= top1))) / (1 + permutations)


def test_confounded_null_cohort_is_a_trap_that_residualising_removes(tmp_path):
    """No gene->brain signal, but sex (X-linked genes; brain) and ancestry (genes; site in the brain)
    reach both modalities: a linear model retrieves above chance until the covariates are regressed
    out. 2,000 subjects x 74 genes x 4 dims, (2, 4, 4, 4) latents; 1,000 train, 10 pools of 100."""
    res = synthesize(SynthConfig(out_dir=tmp_path / "c", subjects=2000, genes=74, embedding_dim=4,
                                 latent_shape=(2, 4, 4, 4), null=True, confounds=True))
    _, _, iids, genes, neuro = read_cohort(res)
    cov = read_covariates(res).loc[iids]
    flat = genes.reshape(len(genes), -1).astype(np.float64)
    raw_top1, raw_p = cca_top1(flat, neuro.astype(np.float64), cov, residualise=False)
    res_top1, res_p = cca_top1(flat, neuro.astype(np.float64), cov, residualise=True)
    assert raw_p < 0.01 and raw_top1 > 0.02, (raw_top1, raw_p)  # chance 0.01
    assert res_p >= 0.01 and res_top1 < 0.02, (res_top1, res_p)

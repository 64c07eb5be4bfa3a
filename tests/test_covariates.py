"""Covariates and relatedness at ingest: reading, one-hot coding, drop reasons, family splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline import open_store
from pipeline.covariates import KinshipPairs, family_split, read_covariates, read_kinship
from pipeline.errors import GenealignError
from pipeline.ingest import IngestConfig, ingest
from pipeline.store import SPLIT_CODES, assign_split
from pipeline.synth import SynthConfig, synthesize


def _csv(path, text: str):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ reading
def test_numeric_columns_as_they_are_text_one_hot_against_the_first_level(tmp_path):
    table = read_covariates(_csv(tmp_path / "c.csv", "IID,age,site,sex\n7,60.5,b,1\n3,70,a,0\n5,,c,1\n"), "IID",
                            categorical=("sex",))
    assert table.iids.tolist() == ["7", "3", "5"]
    assert table.names == ["age", "site=b", "site=c", "sex=1"]
    assert table.groups == {"age": ["age"], "site": ["site=b", "site=c"], "sex": ["sex=1"]}
    np.testing.assert_array_equal(table.values[:2], [[60.5, 1, 0, 1], [70, 0, 0, 0]])
    assert table.first_missing.tolist() == [-1, -1, 0]  # row 3 has no age


def test_tab_separated_file_is_read(tmp_path):
    table = read_covariates(_csv(tmp_path / "c.tsv", "IID\tage\n1\t50\n2\t51\n"), "IID")
    assert table.names == ["age"] and table.values[:, 0].tolist() == [50, 51]


@pytest.mark.parametrize("text, message", [
    ("ID,age\n1,50\n", "no 'IID' column"),
    ("IID,age\n1,50\n2,51\n1,52\n", "'1' appears twice, on lines 2 and 4"),
    ("IID,age\n1,50\n2,5O\n3,52\n", "line 3, column 'age': '5O' is not a number"),
    ("IID,age\n1,50\n,51\n", "line 3: empty IID"),
])
def test_bad_covariates_file_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(GenealignError, match=message):
        read_covariates(_csv(tmp_path / "c.csv", text), "IID")


def test_id_like_text_column_and_unknown_categorical_are_errors(tmp_path):
    ids = "".join(f"{i},x{i}\n" for i in range(150))
    with pytest.raises(GenealignError, match="150 distinct values"):
        read_covariates(_csv(tmp_path / "c.csv", "IID,FID\n" + ids), "IID")
    with pytest.raises(GenealignError, match="--categorical sitex: no such covariate column"):
        read_covariates(_csv(tmp_path / "d.csv", "IID,site\n1,a\n"), "IID", categorical=("sitex",))


def test_kinship_file_errors_name_the_line_and_the_column(tmp_path):
    pairs = read_kinship(_csv(tmp_path / "k.dat", "ID1 ID2 HetHet IBS0 Kinship\n1 2 0.1 0.002 0.25\n"))
    assert pairs.id1.tolist() == ["1"] and pairs.kinship.tolist() == [0.25]
    with pytest.raises(GenealignError, match="line 3, column 'Kinship': 'high' is not a number"):
        read_kinship(_csv(tmp_path / "b.dat", "ID1 ID2 HetHet IBS0 Kinship\n1 2 0.1 0 0.25\n3 4 0.1 0 high\n"))
    with pytest.raises(GenealignError, match="no column Kinship"):
        read_kinship(_csv(tmp_path / "c.dat", "ID1 ID2 HetHet\n1 2 0.1\n"))


# ------------------------------------------------------------------------------------- family split
def test_family_split_keeps_every_family_together_and_leaves_singletons_on_the_hash():
    rng = np.random.default_rng(0)
    iids = np.sort(np.array([str(1_000_000 + i) for i in range(3000)]))
    a, b = rng.integers(0, 3000, 800), rng.integers(0, 3000, 800)
    kin = np.where(rng.random(800) < 0.8, 0.25, 0.02)  # a fifth below the threshold
    pairs = KinshipPairs(path="k.dat", id1=np.append(iids[a], "999"), id2=np.append(iids[b], iids[0]),
                         kinship=np.append(kin, 0.25))
    split, record = family_split(iids, pairs, 0.0442, (0.8, 0.1, 0.1))
    related = kin >= 0.0442
    assert (split[a[related]] == split[b[related]]).all()
    assert record["cross_split_pairs"] == 0 and record["pairs_with_iid_not_in_cohort"] == 1
    assert record["pairs_below_threshold"] == int((~related).sum())
    # Brute force: a subject in no related pair keeps its own IID-hash split.
    in_pair = np.zeros(3000, bool)
    in_pair[a[related]] = in_pair[b[related]] = True
    np.testing.assert_array_equal(split[~in_pair], assign_split(iids[~in_pair]))
    assert record["cross_split_pairs_with_iid_hash_split"] > 0  # the leak the family split prevents


# ------------------------------------------------------------------------------------------- ingest
@pytest.fixture(scope="module")
def related_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("related")
    return synthesize(SynthConfig(out_dir=out / "cohort", subjects=500, genes=4, embedding_dim=4,
                                  latent_shape=(4, 4, 4), confounds=True, families=0.4))


def _config(cohort, store, **kwargs) -> IngestConfig:
    return IngestConfig(cohort.gene_embedding_dir, cohort.brain_latent_dir, store, workers=1, **kwargs)


def test_ingest_stores_covariates_by_iid_and_families_in_one_split(related_cohort, tmp_path):
    out = related_cohort.out_dir
    result = ingest(_config(related_cohort, tmp_path / "s.zarr", covariates=out / "covariates.csv",
                            kinship=out / "kinship.dat"))
    view = open_store(tmp_path / "s.zarr")
    source = pd.read_csv(out / "covariates.csv", dtype={"IID": str}).set_index("IID").loc[view.iid.tolist()]
    np.testing.assert_allclose(view.covariates[:, view.covariate_names.index("age")], source["age"], rtol=1e-6)
    site = view.covariates[:, view.covariate_names.index("site=site_2")]
    np.testing.assert_array_equal(site, (source["site"] == "site_2").to_numpy())
    assert view.covariate_groups["site"][0] == "site=site_2"
    rel = view.relatedness
    assert rel["controlled"] and rel["families"] > 20 and rel["cross_split_pairs"] == 0
    kinship = pd.read_csv(out / "kinship.dat", sep=r"\s+", dtype=str)
    position = {iid: i for i, iid in enumerate(view.iid.tolist())}
    both = [(position[x], position[y]) for x, y in zip(kinship.ID1, kinship.ID2) if x in position and y in position]
    assert len(both) == rel["related_pairs"] and all(view.split[i] == view.split[j] for i, j in both)
    assert result.relatedness == rel
    report = json.loads((tmp_path / "s.zarr" / "ingest_report.json").read_text())
    assert report["relatedness"]["cross_split_pairs"] == 0 and report["covariates"]["rows_in_file"] == 500


def test_missing_covariate_drops_the_subject_with_its_reason(related_cohort, tmp_path):
    frame = pd.read_csv(related_cohort.out_dir / "covariates.csv", dtype={"IID": str})
    store_iids = open_store(_ingested(related_cohort, tmp_path / "plain.zarr")).iid
    victim = store_iids[3]
    frame.loc[frame.IID == victim, "head_size"] = np.nan
    frame = frame[frame.IID != store_iids[4]]
    frame = pd.concat([frame, pd.DataFrame({"IID": ["0000001"], "age": [50]})])  # not in the cohort: counted
    frame.to_csv(tmp_path / "cov.csv", index=False, na_rep="NA")
    result = ingest(_config(related_cohort, tmp_path / "s.zarr", covariates=tmp_path / "cov.csv"))
    reasons = dict(result.dropped)
    assert reasons[victim] == "missing covariate head_size"
    assert reasons[store_iids[4]] == "no row in covariates file"
    assert result.n_kept == len(store_iids) - 2
    assert json.loads((tmp_path / "s.zarr" / "ingest_report.json").read_text())["covariates"]["rows_not_in_store"] >= 1
    assert not open_store(tmp_path / "s.zarr").relatedness["controlled"]


def _ingested(cohort, store):
    ingest(_config(cohort, store))
    return store


def test_changed_covariates_file_makes_the_store_stale(related_cohort, tmp_path):
    cov = tmp_path / "cov.csv"
    cov.write_text((related_cohort.out_dir / "covariates.csv").read_text())
    ingest(_config(related_cohort, tmp_path / "s.zarr", covariates=cov))
    assert ingest(_config(related_cohort, tmp_path / "s.zarr", covariates=cov)).reused
    cov.write_text(cov.read_text().replace(",site_1,", ",site_9,", 1))
    with pytest.raises(GenealignError, match="out of date.*covariates"):
        ingest(_config(related_cohort, tmp_path / "s.zarr", covariates=cov))


def test_cli_ingest_and_info_report_relatedness(related_cohort, tmp_path):
    from alignment.cli import app

    out, runner = related_cohort.out_dir, CliRunner()
    args = ["ingest", "--gene_embedding_dir", str(related_cohort.gene_embedding_dir), "--brain_latent_dir",
            str(related_cohort.brain_latent_dir), "--workers", "1"]
    plain = runner.invoke(app, [*args, "--store", str(tmp_path / "a.zarr")])
    assert plain.exit_code == 0 and "not controlled" in plain.output
    info = runner.invoke(app, ["info", "--store", str(tmp_path / "a.zarr")], terminal_width=200)
    assert "relatedness" in info.output and "not controlled" in info.output
    bad = runner.invoke(app, [*args, "--store", str(tmp_path / "b.zarr"), "--kinship", str(out / "covariates.csv")])
    assert bad.exit_code == 1 and "no column ID1, ID2, Kinship" in " ".join(bad.output.split())
    assert "Traceback" not in bad.output
    good = runner.invoke(app, [*args, "--store", str(tmp_path / "c.zarr"), "--covariates", str(out / "covariates.csv"),
                               "--kinship", str(out / "kinship.dat")], terminal_width=200)
    words = " ".join(good.output.split())
    assert good.exit_code == 0 and "0 pairs across splits" in words and "site=site_2" in words

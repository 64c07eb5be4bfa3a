"""Ingest: CSVs + npz -> store round trip, the join and its report, splits, errors, atomicity, reuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline.ingest as ingest_module
import pipeline.store as store_module
from pipeline import open_store
from pipeline.errors import GenealignError, GeneNotFoundError
from pipeline.ingest import IngestConfig, get_all_gene_names, ingest, parse_gene_list, store_summary

SHAPE = (2, 3, 2)
DIM = 4


# ------------------------------------------------------------------------------------------- helpers
def write_gene_csv(gdir: Path, gene: str, iids, values=None, *, iid_column="IID", seed=0, shuffle=True) -> Path:
    """One gene CSV; rows in a shuffled order unless told otherwise (real files are not sorted)."""
    gdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if values is None:
        values = rng.normal(size=(len(iids), DIM)).astype(np.float32)
    frame = pd.DataFrame(values, columns=[f"e{i}" for i in range(np.shape(values)[1])])
    frame.insert(0, iid_column, list(iids))
    if shuffle:
        frame = frame.sample(frac=1.0, random_state=seed)
    path = gdir / f"{gene}_brain_gene_embeddingUKB.csv"
    frame.to_csv(path, index=False)
    return path


def write_latent(ldir: Path, iid: str, array=None, *, seed=0, **arrays) -> Path:
    ldir.mkdir(parents=True, exist_ok=True)
    if array is None and not arrays:
        array = np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
    path = ldir / f"{iid}_latent.npz"
    if array is not None:
        arrays = {"latent": array, **arrays}
    np.savez(path, **arrays)
    return path


def write_cohort(root: Path, iids, genes=("APOE", "BDNF", "COMT")) -> tuple[Path, Path]:
    gdir, ldir = root / "genes", root / "latents"
    for g, gene in enumerate(genes):
        write_gene_csv(gdir, gene, iids, seed=g)
    for i, iid in enumerate(iids):
        write_latent(ldir, iid, seed=1000 + i)
    return gdir, ldir


def iids_of(n: int, start: int = 1000001) -> list[str]:
    return [str(start + i) for i in range(n)]


def config(gdir, ldir, store, **kwargs) -> IngestConfig:
    return IngestConfig(gene_embedding_dir=gdir, brain_latent_dir=ldir, store=store, **kwargs)


def source_values(gdir: Path, gene: str, iid_column="IID") -> dict[str, np.ndarray]:
    """The reference parse: pandas with the IID as text and the values as float32."""
    header = pd.read_csv(gdir / f"{gene}_brain_gene_embeddingUKB.csv", nrows=0).columns
    dtypes = {c: np.float32 for c in header if c != iid_column}
    dtypes[iid_column] = str
    frame = pd.read_csv(gdir / f"{gene}_brain_gene_embeddingUKB.csv", dtype=dtypes)
    values = frame.drop(columns=iid_column).to_numpy(np.float32)
    return dict(zip(frame[iid_column].tolist(), values))


@pytest.fixture
def small_chunks(monkeypatch):
    """7 subjects per chunk, so tiny cohorts span several chunks and a partial last one; a copy task
    per chunk, and a separate scratch read for every gap in the wanted rows."""
    monkeypatch.setattr(store_module, "chunk_rows_for", lambda row_bytes, **_: 7)
    monkeypatch.setattr(ingest_module, "COPY_TASK_BYTES", 1)
    monkeypatch.setattr(ingest_module, "GAP_ROWS", 0)


# ---------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_float32_matches_source_files(tmp_path, small_chunks, workers):
    iids = iids_of(40)
    gdir, ldir = write_cohort(tmp_path, iids)
    result = ingest(config(gdir, ldir, tmp_path / "s.zarr", workers=workers))
    view = open_store(tmp_path / "s.zarr")
    assert not result.reused and result.n_kept == 40 and view.chunk_rows == 7
    assert view.iid.tolist() == sorted(iids)
    assert view.gene_names == ("APOE", "BDNF", "COMT")
    assert view.neuro.dtype == np.float32 and view.latent_shape == SHAPE
    neuro = np.asarray(view.neuro[:])  # (N, *SHAPE)
    genes = np.asarray(view.genes[:])  # (N, G, D)
    for g, gene in enumerate(view.gene_names):
        reference = source_values(gdir, gene)
        np.testing.assert_array_equal(genes[:, g, :], np.stack([reference[i] for i in view.iid]))
    for row, iid in enumerate(view.iid):
        np.testing.assert_array_equal(neuro[row], np.load(ldir / f"{iid}_latent.npz")["latent"])
    assert np.array_equal(view.split, store_module.assign_split(view.iid))


def test_every_chunk_is_written_even_when_it_holds_only_zeros(tmp_path, small_chunks):
    """The copy writes chunks as they are (write_empty_chunks): zarr's default would compare each
    chunk with the fill value first and leave all-zero chunks unwritten."""
    iids = iids_of(21)  # 3 chunks of 7; the first 7 subjects (sorted) have all-zero values
    gdir, ldir = tmp_path / "genes", tmp_path / "latents"
    for g, gene in enumerate(("APOE", "BDNF")):
        values = np.random.default_rng(g).normal(size=(21, DIM)).astype(np.float32)
        values[:7] = 0.0
        write_gene_csv(gdir, gene, iids, values, seed=g)
    for i, iid in enumerate(iids):
        write_latent(ldir, iid, np.zeros(SHAPE, np.float32) if i < 7 else None, seed=i)
    ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    for name in ("neuro", "genes"):
        written = sorted(p.name for p in (tmp_path / "s.zarr" / name).iterdir() if p.name.startswith("c."))
        assert len(written) == 3 and written[0].startswith("c.0."), (name, written)
    assert not np.asarray(open_store(tmp_path / "s.zarr").genes[:7]).any()


def test_float16_within_rounding(tmp_path):
    iids = iids_of(12)
    gdir, ldir = write_cohort(tmp_path, iids)
    ingest(config(gdir, ldir, tmp_path / "s.zarr", dtype="float16"))
    view = open_store(tmp_path / "s.zarr")
    assert view.dtype == "float16" and view.neuro.dtype == np.float16
    neuro, genes = view.read_rows(np.arange(view.n_subjects))
    reference = source_values(gdir, "BDNF")
    expected = np.stack([reference[i] for i in view.iid])
    np.testing.assert_allclose(genes[:, 1, :], expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(genes[:, 1, :], expected.astype(np.float16).astype(np.float32))
    latent = np.load(ldir / f"{view.iid[3]}_latent.npz")["latent"]
    np.testing.assert_allclose(neuro[3], latent.ravel(), rtol=1e-3, atol=1e-3)


def test_user_gene_order_and_subset(tmp_path):
    iids = iids_of(9)
    gdir, ldir = write_cohort(tmp_path, iids)
    result = ingest(config(gdir, ldir, tmp_path / "s.zarr", genes=("COMT", "APOE")))
    view = open_store(tmp_path / "s.zarr")
    assert view.gene_names == ("COMT", "APOE") and result.gene_names == ("COMT", "APOE")
    genes = np.asarray(view.genes[:])
    reference = source_values(gdir, "COMT")
    np.testing.assert_array_equal(genes[:, 0, :], np.stack([reference[i] for i in view.iid]))


def test_leading_zero_iids_stay_distinct(tmp_path):
    iids = ["0012345", "12345", "012345", "1000001"]
    gdir, ldir = write_cohort(tmp_path, iids)
    ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    view = open_store(tmp_path / "s.zarr")
    assert sorted(view.iid.tolist()) == sorted(iids)
    reference = source_values(gdir, "APOE")
    genes = np.asarray(view.genes[:])
    for row, iid in enumerate(view.iid):
        np.testing.assert_array_equal(genes[row, 0], reference[iid])
        np.testing.assert_array_equal(
            np.asarray(view.neuro[row]), np.load(ldir / f"{iid}_latent.npz")["latent"]
        )


def test_text_join_with_gaps_extras_and_leading_zeros(tmp_path, small_chunks):
    iids = iids_of(30) + ["0012345", "12345", "012345"]
    gdir, ldir = write_cohort(tmp_path, iids)
    (ldir / f"{iids[3]}_latent.npz").unlink()  # no latent
    write_gene_csv(gdir, "BDNF", [i for i in iids if i != iids[5]] + ["9999999"], seed=1)  # one missing, one extra
    result = ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    assert sorted(result.dropped) == sorted([(iids[3], "no latent"), (iids[5], "missing from gene BDNF"),
                                             ("9999999", "no latent")])
    view = open_store(tmp_path / "s.zarr")
    assert view.iid.tolist() == sorted(set(iids) - {iids[3], iids[5]})
    genes = np.asarray(view.genes[:])
    for g, gene in enumerate(view.gene_names):
        reference = source_values(gdir, gene)
        np.testing.assert_array_equal(genes[:, g, :], np.stack([reference[i] for i in view.iid]))


@pytest.mark.parametrize("workers", [1, 2])
def test_long_and_non_ascii_iids_are_joined_as_text(tmp_path, small_chunks, workers):
    iids = iids_of(12) + ["SUBJECT-000000001", "sujet-é", "0012345"]
    gdir, ldir = write_cohort(tmp_path, iids)
    ingest(config(gdir, ldir, tmp_path / "s.zarr", workers=workers))
    view = open_store(tmp_path / "s.zarr")
    assert view.iid.tolist() == sorted(iids)
    reference = source_values(gdir, "COMT")
    genes = np.asarray(view.genes[:])
    for row, iid in enumerate(view.iid):
        np.testing.assert_array_equal(genes[row, 2], reference[iid])
        np.testing.assert_array_equal(np.asarray(view.neuro[row]), np.load(ldir / f"{iid}_latent.npz")["latent"])


def test_latent_key_choice(tmp_path):
    gdir = tmp_path / "genes"
    ldir = tmp_path / "latents"
    write_gene_csv(gdir, "APOE", ["1", "2", "3"])
    a, b = np.ones(SHAPE, np.float32), np.full(SHAPE, 2.0, np.float32)
    np.savez(ldir.mkdir() or ldir / "1_latent.npz", arr_0=a)  # the only array, whatever its name
    np.savez(ldir / "2_latent.npz", latent=a, other=b)  # `latent` preferred
    np.savez(ldir / "3_latent.npz", mu=b, latent=a)
    ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    assert np.all(np.asarray(open_store(tmp_path / "s.zarr").neuro[:]) == 1.0)
    np.savez(ldir / "1_latent.npz", mu=b, latent=a)
    np.savez(ldir / "2_latent.npz", mu=b, latent=a)
    ingest(config(gdir, ldir, tmp_path / "mu.zarr", latent_key="mu"))
    assert np.all(np.asarray(open_store(tmp_path / "mu.zarr").neuro[:]) == 2.0)


# ------------------------------------------------------------------------------------ join + report
@pytest.mark.parametrize("workers", [1, 2])
def test_join_drops_each_reason_and_reports_it(tmp_path, small_chunks, workers):
    gdir, ldir = tmp_path / "genes", tmp_path / "latents"
    good = iids_of(16)
    apoe = good + ["10000031", "10000052", "10000073", "10000094", "10000115", "10000136"]
    bdnf = good + ["10000031", "10000073", "10000094", "10000115", "10000136"]  # 10000052 missing from BDNF
    values = np.random.default_rng(0).normal(size=(len(apoe), DIM)).astype(np.float32)
    values[apoe.index("10000073"), 1] = np.nan  # NaN in APOE
    values[apoe.index("10000094"), 2] = np.inf
    write_gene_csv(gdir, "APOE", apoe, values)
    write_gene_csv(gdir, "BDNF", bdnf, seed=1)
    for iid in good + ["10000052", "10000073", "10000094", "10000018"]:  # 10000018: latent only
        write_latent(ldir, iid, seed=int(iid))
    # Dropped IIDs sort between kept ones, so they leave gaps inside chunks and scratch blocks.
    # 10000031: no latent. 10000115: wrong shape. 10000136: unreadable. 10000157: NaN latent, no CSV row.
    write_latent(ldir, "10000115", np.zeros((3, 3), np.float32))
    (ldir / "10000136_latent.npz").write_bytes(b"this is not a zip file")
    write_latent(ldir, "10000157", np.full(SHAPE, np.nan, np.float32))

    result = ingest(config(gdir, ldir, tmp_path / "s.zarr", workers=workers))
    expected = {
        "10000031": "no latent",
        "10000052": "missing from gene BDNF",
        "10000073": "NaN or inf in gene APOE",
        "10000094": "NaN or inf in gene APOE",
        "10000115": "latent of wrong shape",
        "10000136": "unreadable latent",
        "10000157": "NaN or inf in latent",
        "10000018": "in no gene CSV",
    }
    assert dict(result.dropped) == expected
    assert result.n_kept == len(good)
    assert result.dropped_by_reason == {
        "no latent": 1, "missing from gene BDNF": 1, "NaN or inf in gene APOE": 2, "latent of wrong shape": 1,
        "unreadable latent": 1, "NaN or inf in latent": 1, "in no gene CSV": 1,
    }
    assert result.dropped_by_kind == {
        "NaN or inf in a gene CSV": 2, "no latent": 1, "missing from a gene CSV": 1, "latent of wrong shape": 1,
        "unreadable latent": 1, "NaN or inf in latent": 1, "in no gene CSV": 1,
    }
    assert result.found["latent files"] == 23 and result.found["usable latents"] == 20
    assert result.found["IIDs in any gene CSV"] == 22 and result.found["IIDs in every gene CSV"] == 21
    view = open_store(tmp_path / "s.zarr")
    assert view.iid.tolist() == good
    report = view.report()
    assert {e["iid"]: e["reason"] for e in report["dropped"]} == expected
    assert report["kept"] == len(good) and report["rows_per_gene"] == {"APOE": 22, "BDNF": 21}
    # The kept rows' values survive the gaps the dropped subjects leave in every scratch table.
    genes = np.asarray(view.genes[:])
    for g, gene in enumerate(("APOE", "BDNF")):
        reference = source_values(gdir, gene)
        np.testing.assert_array_equal(genes[:, g, :], np.stack([reference[i] for i in good]))
    for row, iid in enumerate(good):
        np.testing.assert_array_equal(np.asarray(view.neuro[row]), np.load(ldir / f"{iid}_latent.npz")["latent"])
    wrong = next(e for e in report["dropped"] if e["iid"] == "10000115")
    assert "(3, 3)" in wrong["detail"] and str(SHAPE) in wrong["detail"]


def test_majority_latent_shape_wins(tmp_path):
    gdir, ldir = tmp_path / "genes", tmp_path / "latents"
    iids = iids_of(5)
    write_gene_csv(gdir, "APOE", iids)
    write_latent(ldir, iids[0], np.zeros((4, 4), np.float32))  # the first file is the odd one
    for iid in iids[1:]:
        write_latent(ldir, iid)
    result = ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    assert result.latent_shape == SHAPE and result.n_kept == 4
    assert dict(result.dropped) == {iids[0]: "latent of wrong shape"}


# ------------------------------------------------------------------------------------------- splits
def test_split_stable_when_subjects_are_added(tmp_path):
    first = iids_of(60)
    gdir, ldir = write_cohort(tmp_path, first)
    ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    before = dict(zip(open_store(tmp_path / "s.zarr").iid.tolist(), open_store(tmp_path / "s.zarr").split.tolist()))
    assert set(before.values()) == {0, 1, 2}

    more = iids_of(40, start=5000001)
    gdir, ldir = write_cohort(tmp_path, first + more)
    with pytest.raises(GenealignError, match="out of date.*--overwrite"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    ingest(config(gdir, ldir, tmp_path / "s.zarr", overwrite=True))
    view = open_store(tmp_path / "s.zarr")
    after = dict(zip(view.iid.tolist(), view.split.tolist()))
    assert len(after) == 100
    assert {iid: after[iid] for iid in first} == before


# ------------------------------------------------------------------------------------------- errors
def test_missing_directories(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    with pytest.raises(GenealignError, match="nope.*does not exist.*--gene_embedding_dir"):
        ingest(config(tmp_path / "nope", ldir, tmp_path / "s.zarr"))
    with pytest.raises(GenealignError, match="gone.*does not exist.*--brain_latent_dir"):
        ingest(config(gdir, tmp_path / "gone", tmp_path / "s.zarr"))


def test_no_gene_files(tmp_path):
    _, ldir = write_cohort(tmp_path, iids_of(3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "APOE.csv").write_text("IID,e0\n1,2\n")
    with pytest.raises(GenealignError, match="No gene embedding files found in .*empty.*_brain_gene_embeddingUKB.csv"):
        ingest(config(tmp_path / "empty", ldir, tmp_path / "s.zarr"))


def test_gene_not_found_suggests_close_matches(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    with pytest.raises(GeneNotFoundError) as info:
        ingest(config(gdir, ldir, tmp_path / "s.zarr", genes=("APOE", "APOF")))
    message = str(info.value)
    assert "Gene 'APOF' not found" in message and "Did you mean APOE?" in message
    assert "Available genes: APOE, BDNF, COMT" in message and f"`ls {gdir.resolve()}`" in message
    assert "get_all_gene_names" not in message and "pipeline." not in message
    assert isinstance(info.value, ValueError)  # the seed raised ValueError
    with pytest.raises(GeneNotFoundError, match="Did you mean BDNF"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", genes=("bdnf",)))
    assert not (tmp_path / "s.zarr").exists()


def test_missing_iid_column_names_columns_found(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    with pytest.raises(GenealignError, match="no IID column 'eid'; columns found: IID, e0.*--iid_column"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", iid_column="eid"))


def test_custom_iid_column(tmp_path):
    gdir, ldir = tmp_path / "genes", tmp_path / "latents"
    write_gene_csv(gdir, "APOE", ["1", "2"], iid_column="eid")
    write_latent(ldir, "1")
    write_latent(ldir, "2")
    assert ingest(config(gdir, ldir, tmp_path / "s.zarr", iid_column="eid")).n_kept == 2


@pytest.mark.parametrize("cell", ["abc", "1_0"])  # "1_0": Python's float() reads 10.0, a CSV reader does not
def test_non_numeric_value_names_file_line_and_column(tmp_path, cell):
    gdir, ldir = write_cohort(tmp_path, iids_of(5))
    path = gdir / "BDNF_brain_gene_embeddingUKB.csv"
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[2] = cell  # line 4 as an editor shows it, column e1
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    expected = rf"BDNF_brain_gene_embeddingUKB.csv line 4, column 'e1': '{cell}' is not a number"
    with pytest.raises(GenealignError, match=expected):
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))


def test_embedding_widths_differ(tmp_path):
    iids = iids_of(3)
    gdir, ldir = write_cohort(tmp_path, iids, genes=("APOE",))
    write_gene_csv(gdir, "BDNF", iids, np.zeros((3, DIM + 2), np.float32))
    with pytest.raises(GenealignError, match="widths differ.*APOE.*4.*BDNF.*6"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))


@pytest.mark.parametrize("workers", [1, 2])
def test_duplicate_iid_names_both_lines(tmp_path, workers):
    gdir, ldir = write_cohort(tmp_path, iids_of(4))
    write_gene_csv(gdir, "COMT", ["1000001", "1000002", "1000003", "1000002"], shuffle=False)
    expected = "COMT_brain_gene_embeddingUKB.csv: IID '1000002' appears twice, on lines 3 and 5"
    with pytest.raises(GenealignError, match=expected):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", workers=workers))


@pytest.mark.parametrize("workers", [1, 2])
def test_first_failing_csv_in_gene_order_is_reported(tmp_path, workers):
    """CSVs are parsed concurrently; a later gene that fails sooner (small file) must not win."""
    gdir, ldir = write_cohort(tmp_path, iids_of(4))
    write_gene_csv(gdir, "APOE", iids_of(3000) + ["1000002"], shuffle=False)  # duplicate on the last line
    write_gene_csv(gdir, "COMT", iids_of(2), [[0.5, 1, 2, 3], ["oops", 1, 2, 3]], shuffle=False)
    with pytest.raises(GenealignError, match="APOE_brain_gene_embeddingUKB.csv: IID '1000002' appears twice"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", workers=workers))
    assert _partials(tmp_path) == []


def test_npz_with_several_arrays_and_no_latent_key(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    np.savez(ldir / "1000002_latent.npz", mu=np.zeros(SHAPE), logvar=np.zeros(SHAPE))
    with pytest.raises(GenealignError, match="1000002_latent.npz holds several arrays \\(mu, logvar\\).*--latent_key"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    with pytest.raises(GenealignError, match="has no array 'z'.*latent"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", latent_key="z"))


def test_no_paired_subjects_shows_both_sides(tmp_path):
    gdir, _ = write_cohort(tmp_path / "a", ["0012345", "0012346"])
    _, ldir = write_cohort(tmp_path / "b", ["12345", "12346"])
    with pytest.raises(GenealignError) as info:
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    message = str(info.value)
    assert "No paired subjects" in message and "2 latent files (e.g. 12345, 12346)" in message
    assert "2 IIDs in the gene CSVs (e.g. 0012345, 0012346)" in message and "leading zeros" in message
    assert "\n" not in message
    assert not (tmp_path / "s.zarr").exists()


def test_bad_options(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    with pytest.raises(GenealignError, match="--dtype"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", dtype="float64"))
    with pytest.raises(GenealignError, match="--workers"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", workers=0))


def test_refuses_to_replace_a_directory_that_is_not_a_store(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(GenealignError, match="not a genealign store"):
        ingest(config(gdir, ldir, tmp_path / "mine", overwrite=True))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------------------ atomicity and reuse
def _partials(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".s.zarr."))


def test_failure_mid_copy_keeps_previous_store(tmp_path, small_chunks, monkeypatch):
    import zarr

    gdir, ldir = write_cohort(tmp_path, iids_of(30))
    ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    before = np.asarray(open_store(tmp_path / "s.zarr").genes[:])
    real_setitem, writes = zarr.Array.__setitem__, []

    def write_then_fail(array, selection, value):
        if array.ndim < 2:  # iid, gene_names, split
            return real_setitem(array, selection, value)
        writes.append(selection)
        if len(writes) > 2:
            raise OSError("disk on fire")
        real_setitem(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", write_then_fail)
    gdir, ldir = write_cohort(tmp_path, iids_of(40))
    with pytest.raises(OSError, match="disk on fire"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", overwrite=True))
    view = open_store(tmp_path / "s.zarr")
    assert view.n_subjects == 30
    np.testing.assert_array_equal(np.asarray(view.genes[:]), before)
    assert _partials(tmp_path) == []  # temp store and scratch removed


def test_killed_ingest_leaves_previous_store_readable(tmp_path, small_chunks):
    gdir, ldir = write_cohort(tmp_path, iids_of(30))
    ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    gdir, ldir = write_cohort(tmp_path, iids_of(45))
    started = tmp_path / "copy-started"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import zarr
        import pipeline.ingest as m
        import pipeline.store as s
        s.chunk_rows_for = lambda row_bytes, **_: 7
        real = zarr.Array.__setitem__
        def slow(array, selection, value):
            real(array, selection, value)
            if array.ndim > 1:
                Path({str(started)!r}).write_text("x")
                time.sleep(60)
        zarr.Array.__setitem__ = slow
        m.ingest(m.IngestConfig({str(gdir)!r}, {str(ldir)!r}, {str(tmp_path / 's.zarr')!r}, overwrite=True))
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the child never reached the copy"
        assert any(p.endswith(".partial") for p in _partials(tmp_path))  # a half-written store exists...
        # ...which another ingest leaves alone while its run holds it
        assert ingest(config(gdir, ldir, tmp_path / "other.zarr")).n_kept == 45
        assert any(p.endswith(".partial") for p in _partials(tmp_path))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    view = open_store(tmp_path / "s.zarr")  # ...but the previous store is whole
    assert view.n_subjects == 30 and np.isfinite(np.asarray(view.genes[:])).all()
    # The next ingest removes the dead run's leftovers and succeeds.
    assert ingest(config(gdir, ldir, tmp_path / "s.zarr", overwrite=True)).n_kept == 45
    assert _partials(tmp_path) == []


def test_rerun_is_a_noop_unless_inputs_change_or_overwrite(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(8))
    first = ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    stamp = (tmp_path / "s.zarr" / "zarr.json").stat().st_mtime_ns
    again = ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    assert again.reused and not first.reused
    assert (tmp_path / "s.zarr" / "zarr.json").stat().st_mtime_ns == stamp  # nothing rewritten
    assert (again.n_kept, again.n_genes, again.latent_shape, again.found) == (
        first.n_kept, first.n_genes, first.latent_shape, first.found
    )
    assert again.gene_names == first.gene_names and again.split_counts == first.split_counts

    rebuilt = ingest(config(gdir, ldir, tmp_path / "s.zarr", overwrite=True))
    assert not rebuilt.reused and (tmp_path / "s.zarr" / "zarr.json").stat().st_mtime_ns != stamp

    with pytest.raises(GenealignError, match="out of date.*dtype float32 -> float16.*--overwrite"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", dtype="float16"))
    write_gene_csv(gdir, "BDNF", iids_of(8), seed=99)
    with pytest.raises(GenealignError, match="changed: BDNF_brain_gene_embeddingUKB.csv.*--overwrite"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    write_latent(ldir, "1000001", seed=5)
    os.utime(ldir / "1000001_latent.npz", ns=(1, 1))
    write_latent(ldir, "9999999")
    with pytest.raises(GenealignError, match="latent files: 1 added, 0 removed, 1 changed"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))


# ---------------------------------------------------------------------------------- small helpers
def test_parse_gene_list(tmp_path):
    assert parse_gene_list(None, None) is None
    assert parse_gene_list(" APOE, BDNF,,APOE ", None) == ("APOE", "BDNF")
    genes_file = tmp_path / "genes.txt"
    genes_file.write_text("# my genes\nCOMT\nAPOE  # the famous one\n\nBDNF,MTHFR\n")
    assert parse_gene_list(None, genes_file) == ("COMT", "APOE", "BDNF", "MTHFR")
    with pytest.raises(GenealignError, match="not both"):
        parse_gene_list("APOE", genes_file)
    with pytest.raises(GenealignError, match="does not exist"):
        parse_gene_list(None, tmp_path / "missing.txt")
    with pytest.raises(GenealignError, match="No gene names"):
        parse_gene_list(" , ", None)


def test_get_all_gene_names_sorted(tmp_path):
    gdir, _ = write_cohort(tmp_path, iids_of(2), genes=("COMT", "APOE", "BDNF"))
    (gdir / "notes.txt").write_text("ignored")
    assert get_all_gene_names(gdir) == ["APOE", "BDNF", "COMT"]
    with pytest.raises(GenealignError, match="does not exist"):
        get_all_gene_names(tmp_path / "nope")


def test_store_summary_and_attrs(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(20))
    write_latent(ldir, "7777777")
    ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    view = open_store(tmp_path / "s.zarr")
    summary = store_summary(view)
    assert summary["subjects"] == 20 and sum(summary["split"].values()) == 20
    assert summary["gene_names"] == ["APOE", "BDNF", "COMT"] and summary["latent_shape"] == list(SHAPE)
    assert summary["dtype"] == "float32" and summary["compression"] == "none"
    assert summary["dropped_by_kind"] == {"in no gene CSV": "1 subject"} and summary["dropped"] == 1
    assert summary["sources"]["gene_embedding_dir"] == str(gdir.resolve())
    assert summary["chunks"]["genes"] == [view.chunk_rows, 3, DIM]
    assert summary["size_on_disk"].endswith("B") and summary["created"]
    attrs = view.attrs
    assert attrs["fingerprints"]["latent_files"]["count"] == 21
    gene_files = {f"{g}_brain_gene_embeddingUKB.csv" for g in ("APOE", "BDNF", "COMT")}
    assert set(attrs["fingerprints"]["gene_files"]) == gene_files
    assert attrs["split_fractions"] == [0.8, 0.1, 0.1] and attrs["ingest"]["options"]["dtype"] == "float32"
    assert json.loads((tmp_path / "s.zarr" / "fingerprints.json").read_text())["latent_files"]["7777777_latent.npz"]
    assert view.cohort_truth_path() is None


# ------------------------------------------------------------------------------------ CSV quirks
def test_csv_quirks_bom_crlf_quotes_and_na_like_iids(tmp_path):
    gdir, ldir = tmp_path / "genes", tmp_path / "latents"
    gdir.mkdir()
    text = '\ufeffIID,e0,e1\r\n"0012",1.5,2\r\nNA,3,4.25\r\nnull,-1e-3,7\r\n'
    (gdir / "APOE_brain_gene_embeddingUKB.csv").write_text(text, encoding="utf-8", newline="")
    for iid in ("0012", "NA", "null"):
        write_latent(ldir, iid)
    result = ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    view = open_store(tmp_path / "s.zarr")
    assert result.n_kept == 3 and view.iid.tolist() == ["0012", "NA", "null"]
    np.testing.assert_array_equal(np.asarray(view.genes[:])[:, 0, :], np.float32([[1.5, 2], [3, 4.25], [-1e-3, 7]]))


def test_empty_iid_is_an_error_with_its_line(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    (gdir / "APOE_brain_gene_embeddingUKB.csv").write_text("IID,e0,e1,e2,e3\n1000001,1,2,3,4\n,1,2,3,4\n")
    with pytest.raises(GenealignError, match="APOE_brain_gene_embeddingUKB.csv line 3: empty IID"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr"))


def test_float16_overflow_is_an_error(tmp_path):
    iids = iids_of(3)
    gdir, ldir = write_cohort(tmp_path, iids, genes=("APOE",))
    write_gene_csv(gdir, "APOE", iids, np.full((3, DIM), 1e6, np.float32), shuffle=False)
    with pytest.raises(GenealignError, match="line 2, column 'e0'.*float16 range.*--dtype float32"):
        ingest(config(gdir, ldir, tmp_path / "s.zarr", dtype="float16"))




# ------------------------------------------------------------------------------ CLI: ingest and info
def _cli(*args, **env):
    from typer.testing import CliRunner

    from alignment.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80", **env})


def test_info_folds_drops_by_kind_with_thousands_separators_at_80_columns(tmp_path):
    iids = iids_of(1005)
    gdir, ldir = tmp_path / "genes", tmp_path / "latents"
    write_gene_csv(gdir, "APOE", iids)
    write_gene_csv(gdir, "BDNF", iids[:-3], seed=1)  # 3 subjects missing from BDNF
    write_gene_csv(gdir, "COMT", iids[:-3] + iids[-2:], seed=2)  # one of them also missing here: BDNF comes first
    write_gene_csv(gdir, "DRD2", [i for i in iids if i != iids[0]], seed=3)  # 1 missing from DRD2 only
    for i, iid in enumerate(iids):
        write_latent(ldir, iid, seed=i)
    store = tmp_path / "s.zarr"
    result = _cli("ingest", "--gene-embedding-dir", gdir, "--brain-latent-dir", ldir, "--store", store, "--workers", "1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1,005" in text and "1,001" in text  # latent files found, kept
    info = _cli("info", "--store", store)
    assert info.exit_code == 0, info.output
    assert "…" not in info.output and max(len(line) for line in info.output.splitlines()) <= 80, info.output
    text = " ".join(info.output.split())
    assert "missing from a gene CSV: 4 subjects across 2 genes" in text
    assert "1,001" in text and "1,005" in text
    assert "missing from gene BDNF" not in text  # the per-gene list stays in ingest_report.json
    assert "ingest_report.json" in text
    report = json.loads((store / "ingest_report.json").read_text())
    assert report["dropped_by_reason"] == {"missing from gene BDNF": 3, "missing from gene DRD2": 1}


def test_unknown_gene_on_the_command_line_names_close_matches_not_python(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids_of(3))
    result = _cli("ingest", "--gene-embedding-dir", gdir, "--brain-latent-dir", ldir, "--store", tmp_path / "s.zarr",
                  "--genes", "APOE,BDFN")
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "Gene 'BDFN' not found" in text and "Did you mean BDNF?" in text
    assert "Available genes: APOE, BDNF, COMT" in text and "`ls " in text
    assert "get_all_gene_names" not in text and "pipeline." not in text


def test_reuse_message_mentions_overwrite_only_where_the_command_has_it(tmp_path):
    from alignment import cli

    gdir, ldir = write_cohort(tmp_path, iids_of(4))
    args = ("ingest", "--gene-embedding-dir", gdir, "--brain-latent-dir", ldir, "--store", tmp_path / "s.zarr")
    assert _cli(*args).exit_code == 0
    again = _cli(*args)
    text = " ".join(again.output.split())
    assert again.exit_code == 0 and "up to date" in text and "--overwrite" in text
    reused = ingest(config(gdir, ldir, tmp_path / "s.zarr"))
    assert reused.reused
    with cli.console.capture() as captured:
        cli._print_ingest(reused, rebuild_hint=False)  # as `genealign train --gene_embedding_dir ...` calls it
    text = " ".join(captured.get().split())
    assert "up to date" in text and "--overwrite" not in text

"""Training: the LR schedule, checkpoints, resume, early stopping, learning, and DDP under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import alignment.train as train_module
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.train import TrainConfig, lr_at, train
from pipeline import GenealignError, open_store
from pipeline.store import SPLIT_CODES

GENES = [f"G{i}" for i in range(6)]  # the signal store's genes (conftest)


@pytest.fixture(scope="module")
def store(signal_store) -> Path:
    return signal_store


def tiny_model(mode: str = "sequence", **kw) -> ModelConfig:
    base = dict(mode=mode, projection_dim=16, transformer_hidden_dim=16, transformer_num_layers=1,
                transformer_num_heads=2, dropout=0.0, neuro_pca_dim=8, gene_pca_dim=4)
    base.update(kw)
    return ModelConfig(**base)


def tiny_train(store, out, **kw) -> TrainConfig:
    base = dict(store=str(store), output_dir=str(out), batch_size=32, num_epochs=2, learning_rate=3e-3,
                save_every=1, data_placement="memory", device="cpu", seed=7)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_then_cosine_to_min():
    kw = dict(base_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-7)
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # rising during warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # falling after
    assert lr_at(110, **kw) == pytest.approx(1e-7)
    assert lr_at(60, **kw) == pytest.approx(1e-7 + 0.5 * (1e-3 - 1e-7))  # half-way down the cosine


@pytest.mark.parametrize("mode", ["single", "sequence"])
def test_train_writes_complete_rebuildable_checkpoints(store, tmp_path, mode):
    out = tmp_path / "run"
    gene = "G0" if mode == "single" else None
    result = train(tiny_train(store, out, mode=mode, single_gene_name=gene), tiny_model(mode))
    for name in ("config.json", "metrics.jsonl", "best_model.pt", "last.pt", "checkpoint_epoch_1.pt", "curves.png"):
        assert (out / name).exists(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(r["val_pool_size"] == result.n_val and r["val_chance_top1"] == pytest.approx(1 / result.n_val) for r in lines)

    ckpt = torch.load(out / "best_model.pt", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "epoch", "val_metrics", "config"):
        assert key in ckpt
    assert ckpt["config"]["store"]["gene_names"] == ([gene] if gene else GENES)

    model = MultiGeneAlignmentModel.from_checkpoint(out / "best_model.pt").eval()
    from pipeline import open_store

    view = open_store(store)
    neuro, genes = view.read_rows(view.indices("val")[:5])
    g = torch.from_numpy(genes[:, 0] if gene else genes)
    with torch.no_grad():
        feats = model.encode_gene(g)
        assert feats.shape == (5, 16)
        assert torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)
        assert model.encode_neuro(torch.from_numpy(neuro)).shape == (5, 16)


def test_training_learns_a_real_signal(store, tmp_path):
    result = train(tiny_train(store, tmp_path / "run", num_epochs=15, learning_rate=1e-2), tiny_model("sequence"))
    chance = result.best_val["val_chance_top1"]
    assert result.best_val["val_top1_mean"] > 10 * chance


class Killed(Exception):
    pass


def kill_after_epoch(n: int):
    def progress(event: dict) -> None:
        if event["event"] == "epoch" and event["epoch"] == n:
            raise Killed()

    return progress


@pytest.mark.parametrize("lasso", [0.0, 3.2])
def test_resume_ends_with_the_same_weights(store, tmp_path, lasso):
    model = tiny_model(dropout=0.2, gene_projection="per_gene" if lasso else "shared")
    full = tmp_path / "full"
    train(tiny_train(store, full, num_epochs=4, gene_group_lasso=lasso), model)
    part = tmp_path / "part"
    with pytest.raises(Killed):  # the run dies after epoch 2 (its last.pt is complete)
        train(tiny_train(store, part, num_epochs=4, gene_group_lasso=lasso), model, progress=kill_after_epoch(2))
    assert json.loads((part / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2
    train(tiny_train(store, part, num_epochs=4, resume=True, gene_group_lasso=lasso), model)
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def test_lr_decays_over_the_run(store, tmp_path):
    """metrics.jsonl records the schedule: the LR at the last epoch is below the first (resume is
    covered by test_resume_ends_with_the_same_weights)."""
    run = tmp_path / "r"
    train(tiny_train(store, run, num_epochs=3), tiny_model())
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["lr"] < history[0]["lr"]


def test_patience_stops_early(store, tmp_path):
    result = train(tiny_train(store, tmp_path / "p", num_epochs=20, learning_rate=1e-12, patience=2), tiny_model())
    assert result.stopped_early and result.epochs_run == result.best_epoch + 2 < 20


def test_same_seed_same_weights(store, tmp_path):
    states = []
    for name in ("a", "b"):
        train(tiny_train(store, tmp_path / name, num_epochs=1), tiny_model(dropout=0.1))
        states.append(torch.load(tmp_path / name / "last.pt", weights_only=True)["model_state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unknown_gene_names_the_available_ones(store, tmp_path):
    with pytest.raises(GenealignError, match=r"Gene 'APOE' not found.*Available genes: G0, G1"):
        train(tiny_train(store, tmp_path / "x", mode="single", single_gene_name="APOE"), tiny_model("single"))


def test_resume_without_a_run_is_a_clear_error(store, tmp_path):
    with pytest.raises(GenealignError, match="last.pt does not exist"):
        train(tiny_train(store, tmp_path / "none", resume=True), tiny_model())


def test_batch_larger_than_train_split_is_a_clear_error(store, tmp_path):
    with pytest.raises(GenealignError, match="fewer than one batch"):
        train(tiny_train(store, tmp_path / "x", batch_size=4096), tiny_model())


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_two_processes_match_one_process(store, tmp_path, accum):
    """torchrun with 2 gloo processes of batch B == 1 process of batch 2B (same global batches)."""
    common = ["--store", str(store), "--mode", "sequence", "--num_epochs", "2", "--learning_rate", "3e-3",
              "--projection_dim", "16", "--transformer_hidden_dim", "16", "--transformer_num_layers", "1",
              "--transformer_num_heads", "2", "--dropout", "0", "--gene_projection", "per_gene", "--neuro_pca_dim", "8", "--gene_pca_dim", "4",
              "--data_placement", "memory", "--device", "cpu", "--seed", "7", "--gene_group_lasso", "0.6",
              "--gradient_accumulation_steps", str(accum)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    run1 = subprocess.run([sys.executable, "-m", "alignment.train", *common, "--batch_size", "32",
                           "--output_dir", str(one)], env=env, capture_output=True, text=True, timeout=300)
    assert run1.returncode == 0, run1.stderr[-2000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    run2 = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000 + accum),
                           "-m", "alignment.train", *common, "--batch_size", "16", "--output_dir", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert run2.returncode == 0, run2.stderr[-3000:]
    a = torch.load(one / "last.pt", weights_only=True)
    b = torch.load(two / "last.pt", weights_only=True)
    for k, one_value in a["model_state_dict"].items():
        two_value = b["model_state_dict"][k]
        if k.endswith("self_attn.in_proj_bias"):
            # The key bias has an exactly-zero gradient (softmax is shift-invariant), so its float
            # noise is all Adam sees and normalises to full-size steps; it cannot change any output.
            h = one_value.shape[0] // 3
            one_value, two_value = torch.cat([one_value[:h], one_value[2 * h :]]), torch.cat([two_value[:h], two_value[2 * h :]])
        assert torch.allclose(one_value, two_value, atol=1e-4, rtol=1e-4), k
    assert math.isclose(a["val_metrics"]["train_loss"], b["val_metrics"]["train_loss"], rel_tol=1e-4)


def _gene_block_norms(run_dir: Path) -> torch.Tensor:
    state = torch.load(run_dir / "last.pt", weights_only=True)["model_state_dict"]
    return state["gene_encoder.input_projection.weight"].flatten(1).norm(dim=1)  # (G,)


def test_gene_group_lasso_separates_the_signal_genes(store, tmp_path):
    """G0 and G1 carry the signal. Without the lasso every gene's input block keeps a similar norm;
    with it the noise genes' blocks shrink towards 0 and the signal genes' stay clearly larger."""
    ratios = {}
    for lam in (0.0, 3.2):  # per epoch: 0.8 per step at this store's 4 steps per epoch
        run = tmp_path / f"lasso{lam}"
        result = train(tiny_train(store, run, num_epochs=20, learning_rate=1e-2, gene_group_lasso=lam, save_every=0),
                       tiny_model("sequence", gene_projection="per_gene"))
        norms = _gene_block_norms(run)
        ratios[lam] = float(norms[:2].min() / norms[2:].max())
        assert result.history[-1]["genes_in_use"] == int((norms > 0).sum())
    assert ratios[0.0] < 1.5 and ratios[3.2] > 2.0 and ratios[3.2] > 2 * ratios[0.0], ratios


def test_strong_gene_group_lasso_removes_every_gene(store, tmp_path):
    result = train(tiny_train(store, tmp_path / "run", num_epochs=10, learning_rate=1e-2, gene_group_lasso=20.0, save_every=0),
                   tiny_model("sequence", gene_projection="per_gene"))
    assert result.history[-1]["genes_in_use"] == 0
    assert torch.count_nonzero(_gene_block_norms(tmp_path / "run")) == 0


@pytest.mark.parametrize("batch_size", [16, 32])
def test_gene_group_lasso_pulls_the_same_per_epoch_whatever_the_steps(store, tmp_path, monkeypatch, batch_size):
    """Each step shrinks by lr x L x sqrt(block size) / steps per epoch: over one epoch the pulls add
    up to L x sqrt(block size) in units of lr, with 8 steps (batch 16) as with 4 (batch 32)."""
    pulls = []

    def record(weight, threshold):
        pulls.append(threshold)
        return weight

    monkeypatch.setattr(train_module, "group_soft_threshold", record)
    train(tiny_train(store, tmp_path / "run", num_epochs=1, batch_size=batch_size, learning_rate=1e-2, warmup_fraction=0.0,
                     min_learning_rate=1e-2, gene_group_lasso=2.0, save_every=0), tiny_model("sequence", gene_projection="per_gene"))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model_state_dict"]
    block = state["gene_encoder.input_projection.weight"][0].numel()  # d_in x H of one gene
    n_train = int(np.sum(open_store(store).split == SPLIT_CODES["train"]))
    assert len(pulls) == n_train // batch_size
    assert sum(pulls) / 1e-2 == pytest.approx(2.0 * math.sqrt(block), rel=1e-5)


@pytest.mark.parametrize("mode,projection", [("single", "per_gene"), ("sequence", "shared")])
def test_gene_group_lasso_needs_per_gene_projections(store, tmp_path, mode, projection):
    kw = {"single_gene_name": "G0"} if mode == "single" else {}
    with pytest.raises(GenealignError, match="per-gene input projections"):
        train(tiny_train(store, tmp_path / "x", mode=mode, gene_group_lasso=0.3, **kw),
              tiny_model(mode, gene_projection=projection))


def test_counts_are_checked_up_front(store, tmp_path):
    for kw, needle in ((dict(num_epochs=0), "--num_epochs must be >= 1"), (dict(batch_size=1), "--batch_size must be >= 2"),
                       (dict(log="wandb"), "--log 'wandb'")):
        with pytest.raises(GenealignError, match=needle):
            train(tiny_train(store, tmp_path / "x", **kw), tiny_model())
    assert not (tmp_path / "x").exists()


def test_another_run_in_output_dir_is_refused_and_overwrite_replaces_only_train_files(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "NOTES.txt").write_text("mine")
    train(tiny_train(store, out, num_epochs=1), tiny_model())
    assert (out / "NOTES.txt").read_text() == "mine"  # a foreign file beside a run is left alone
    with pytest.raises(GenealignError, match="holds another run.*--resume.*--overwrite"):
        train(tiny_train(store, out, num_epochs=1, mode="single", single_gene_name="G0"), tiny_model("single"))
    (out / "eval_test").mkdir()
    (out / "eval_test" / "metrics.json").write_text("{}")
    with pytest.raises(GenealignError, match="eval_test"):
        train(tiny_train(store, out, num_epochs=1, overwrite=True), tiny_model())
    (out / "eval_test" / "metrics.json").unlink()
    (out / "eval_test").rmdir()
    train(tiny_train(store, out, num_epochs=1, save_every=0, overwrite=True, mode="single", single_gene_name="G0"),
          tiny_model("single"))
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["mode"] == "single" and not (out / "checkpoint_epoch_1.pt").exists()
    assert (out / "NOTES.txt").read_text() == "mine"


def test_lr_restart_ramps_continuously_to_the_new_cosine():
    old = dict(base_lr=1e-3, warmup_steps=2, total_steps=30, min_lr=1e-7)
    lr0 = lr_at(30, **old)  # the finished run sits at min_lr
    new = dict(old, total_steps=50, restart=(30, lr0, 10))
    assert lr_at(30, **new) == pytest.approx(lr0)
    ramp = [lr_at(s, **new) for s in range(30, 41)]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert max(b - a for a, b in zip(ramp, ramp[1:])) < 0.2 * lr_at(40, **old | {"total_steps": 50})
    assert lr_at(45, **new) == pytest.approx(lr_at(45, **old | {"total_steps": 50}))


def test_tensorboard_log_has_the_metrics_jsonl_figures(store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(tiny_train(store, out, num_epochs=2, log="tensorboard"), tiny_model())
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [e.value for e in events.Scalars("val_top1_mean")]
    assert logged == pytest.approx([r["val_top1_mean"] for r in history])
    assert set(events.Tags()["scalars"]) >= {"train_loss", "val_loss", "lr", "temperature"}


def test_residualised_run_round_trips_and_resume_keeps_the_setting(make_confounded_store, tmp_path):
    from alignment.embed import embed_model
    from alignment.settings import TrainRequest, resolve
    from pipeline import open_store

    path = make_confounded_store(tmp_path / "c.zarr", n=160)
    result = train(tiny_train(path, tmp_path / "run", num_epochs=1, save_every=0), tiny_model())
    assert result.residualized.startswith("Residualised on covariates age, sex, site")
    assert result.relatedness.startswith("Relatedness not controlled")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["residualize"] == "all" and saved["residualize"]["covariates"] == ["age", "sex", "site"]
    assert "age^2" in saved["residualize"]["terms"] and "age*site=site_3" in saved["residualize"]["terms"]

    store = open_store(path)
    model = MultiGeneAlignmentModel.from_checkpoint(result.best_checkpoint)
    assert model.residualizes and model.config.covariate_names == tuple(store.covariate_names)
    rows = store.indices("test")
    neuro, genes = store.read_rows(rows)
    cov = torch.from_numpy(store.covariates[rows])
    with torch.no_grad():
        mine = (model.encode_neuro(torch.from_numpy(neuro), covariates=cov), model.encode_gene(torch.from_numpy(genes), covariates=cov))
    used = embed_model(model, store, rows, list(range(store.n_genes)), torch.device("cpu"))  # what evaluate scores
    for a, b in zip(mine, used):
        torch.testing.assert_close(a, b)
    with pytest.raises(GenealignError, match="trained with covariates residualised.*pass covariates="):
        model.encode_neuro(torch.from_numpy(neuro))
    # Residualised on the fit rows: brain rows carry no linear trace of the covariates any more.
    fit = store.indices("train")
    spec = model.residualizer()
    resid = model.residualize_neuro(torch.from_numpy(store.read_rows(fit)[0]), torch.from_numpy(store.covariates[fit]))
    assert np.abs(spec.design(store.covariates[fit]).T @ resid.double().numpy()).max() < 1e-2

    with pytest.raises(GenealignError, match="--residualize none contradicts the saved run \\(all\\)"):
        resolve(TrainRequest(resume=str(tmp_path / "run"), train_flags={"residualize": "none"}))


# ------------------------------------------------------------------ screening, PCA start, quadratic head
def test_screening_keeps_the_signal_genes_and_the_checkpoint_uses_them(store, tmp_path):
    from alignment.evaluate import EvalConfig, evaluate

    model = tiny_model(gene_projection="per_gene", gene_head="quadratic")
    result = train(tiny_train(store, tmp_path / "run", screen_genes=2, gene_projection_init_pca=4), model)
    ckpt = torch.load(result.best_checkpoint, weights_only=True)
    assert tuple(ckpt["config"]["model"]["gene_names"]) == ("G0", "G1")  # the two genes carrying the factor
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["screening"]["ranked"][:2] in (["G0", "G1"], ["G1", "G0"]) and config["store"]["gene_names"] == ["G0", "G1"]
    rebuilt = MultiGeneAlignmentModel.from_checkpoint(result.best_checkpoint)
    assert rebuilt.config.num_genes == 2 and rebuilt.gene_encoder.quadratic is not None
    metrics = evaluate(EvalConfig(checkpoint=result.best_checkpoint, pool_sizes=("all",), draws=2, bootstrap=20,
                                  permutations=50, baselines="none", oracle=False, device="cpu",
                                  output_dir=tmp_path / "eval")).metrics
    assert metrics["n_subjects"] > 0 and metrics["methods"]["model"]["retrieval"]["neuro_to_gene"]["all"]["top1"] > 0


def test_pca_start_sets_the_first_columns_of_every_gene_map(store):
    from alignment.screening import init_gene_projection
    from alignment.train import build_model
    from pipeline import open_store

    view = open_store(store)
    model = build_model(tiny_model(gene_projection="per_gene"), view, view.gene_names)
    neuro, genes = view.read_rows(view.indices("train"))
    model.fit_frontend(torch.from_numpy(neuro), torch.from_numpy(genes))
    before = model.gene_input_weight().detach().clone()
    init_gene_projection(model, torch.from_numpy(genes), 3)
    weight = model.gene_input_weight().detach()  # (G, kG, H)
    assert torch.equal(weight[:, :, 3:], before[:, :, 3:]) and not torch.equal(weight[:, :, :3], before[:, :, :3])
    # Brute force: mean over genes of x_g @ W_g[:, j] is the j-th joint principal component score, with unit variance.
    x = model._gene_frontend(torch.from_numpy(genes)).double()  # (n, G, kG)
    scores = torch.einsum("ngk,gkq->nq", x, weight[:, :, :3].double()) / x.shape[1]  # (n, 3)
    flat = (x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(0))
    _, _, vt = torch.linalg.svd(flat, full_matrices=False)
    pcs = flat @ vt[:3].T  # (n, 3)
    centred = scores - scores.mean(0)
    assert torch.allclose(centred.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    for j in range(3):
        assert abs(float(torch.corrcoef(torch.stack([centred[:, j], pcs[:, j]]))[0, 1])) > 0.999
    init_gene_projection(model, torch.from_numpy(genes), 99)  # capped at the transformer width (16)
    assert not torch.equal(model.gene_input_weight()[:, :, 15], before[:, :, 15])


def test_quadratic_head_adds_products_of_the_pooled_features():
    from alignment.encoders import GeneSequenceEncoder

    torch.manual_seed(0)
    encoder = GeneSequenceEncoder(4, 3, 8, 1, 2, "mean", 5, 0.0, "per_gene", "quadratic").eval()
    genes = torch.randn(6, 3, 4)
    h = encoder.norm(encoder.transformer(encoder._embed(genes)).mean(dim=1))  # (B, H)
    i, j = torch.triu_indices(8, 8)
    expected = encoder.projection(h) + encoder.quadratic((h[:, :, None] * h[:, None, :])[:, i, j])
    assert torch.allclose(encoder(genes), expected, atol=1e-6)
    assert encoder.quadratic.weight.shape == (5, 36)


def test_screening_flags_are_for_sequence_mode(store, tmp_path):
    with pytest.raises(GenealignError, match="apply to --mode sequence"):
        train(tiny_train(store, tmp_path / "s", mode="single", single_gene_name="G0", screen_genes=2),
              tiny_model("single"))


def test_screening_ranks_genes_as_the_screened_baseline(store):
    from alignment.baselines import fit_baselines, rank_genes
    from pipeline import open_store

    view = open_store(store)
    order = rank_genes(view, view.indices("train"), range(view.n_genes))
    fitted = fit_baselines(view, view.indices("train"), range(view.n_genes), methods=("rrr_screened",))
    screened = fitted.methods["rrr_screened"].chosen["screened_genes"]
    assert [view.gene_names[i] for i in order[: len(screened)]] == screened
    assert set(order[:2]) == {0, 1}  # G0 and G1 carry the factor

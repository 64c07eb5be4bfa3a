"""MultiGeneAlignmentModel / ModelConfig: shapes, front-end fitting, checkpoints, attention, groups."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from alignment import ModelConfig, MultiGeneAlignmentModel
from alignment.model import fit_dims
from pipeline.errors import GenealignError

V, D, G, P = 24, 10, 5, 8


def seq_model(**kw) -> MultiGeneAlignmentModel:
    base = dict(neuro_input_dim=V, gene_input_dim=D, num_genes=G, projection_dim=P, use_transformer=True,
                transformer_hidden_dim=16, transformer_num_layers=2, transformer_num_heads=4, dropout=0.0)
    base.update(kw)
    return MultiGeneAlignmentModel(**base)


def single_model(**kw) -> MultiGeneAlignmentModel:
    base = dict(neuro_input_dim=V, gene_input_dim=D, num_genes=1, projection_dim=P, dropout=0.0)
    base.update(kw)
    return MultiGeneAlignmentModel(**base)


def cohort(n: int, seed: int = 0, v: int = V, genes_shape=(G, D)):
    """Correlated, shifted, scaled raw inputs (so z-scoring and whitening have work to do)."""
    g = torch.Generator().manual_seed(seed)
    neuro = torch.randn(n, 6, generator=g) @ torch.randn(6, v, generator=g) + 0.3 * torch.randn(n, v, generator=g)
    neuro = 5.0 + 3.0 * neuro
    genes = torch.randn(n, *genes_shape, generator=g)
    genes = genes + 0.8 * genes.roll(1, dims=-1) - 2.0
    return neuro, genes


def checkpoint_payload(model: MultiGeneAlignmentModel) -> dict:
    """The contract's checkpoint format, with only weights_only-safe types."""
    return {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": {},
        "scheduler_state_dict": {},
        "epoch": 3,
        "step": 30,
        "val_metrics": {"val_top1_mean": 0.5},
        "config": {"model": model.config.to_dict(), "train": {"batch_size": 4}, "store": {"path": "x.zarr"}},
    }


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_sequence_mode_shapes_and_unit_norm(pooling):
    model = seq_model(transformer_pooling=pooling)
    neuro, genes = cohort(6)
    out = model(neuro, genes)
    assert out["neuro_features"].shape == out["gene_features"].shape == (6, P)
    assert out["logits_per_neuro"].shape == (6, 6)
    assert torch.allclose(out["logits_per_gene"], out["logits_per_neuro"].T)
    for key in ("neuro_features", "gene_features"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(6), atol=1e-5)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert model(neuro, genes, return_loss=False)["loss"] is None
    assert model.encode_gene(genes, normalize=False).norm(dim=-1).sub(1).abs().max() > 1e-3


@pytest.mark.parametrize("hidden", [None, 12])
def test_single_mode_shapes_and_layers(hidden):
    model = single_model(neuro_hidden_dim=hidden)
    neuro, genes = cohort(5, genes_shape=(D,))
    out = model(neuro, genes)
    assert out["gene_features"].shape == out["neuro_features"].shape == (5, P)
    assert torch.allclose(out["gene_features"].norm(dim=-1), torch.ones(5), atol=1e-5)
    assert isinstance(model.gene_encoder, torch.nn.Linear) and model.gene_encoder.bias is None
    if hidden:
        kinds = [type(m).__name__ for m in model.neuro_encoder]
        assert kinds == ["Linear", "LayerNorm", "GELU", "Dropout", "Linear"]
    else:
        assert model.neuro_encoder.bias is None
    with pytest.raises(GenealignError, match="single-mode"):
        model.encode_gene(torch.zeros(5, G, D))
    with pytest.raises(GenealignError, match=r"\(B, 24\)"):
        model.encode_neuro(torch.zeros(5, V + 1))


def test_logit_scale_is_clamped_at_100_in_forward():
    model = seq_model()
    neuro, genes = cohort(4)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    out = model(neuro, genes)
    assert out["logit_scale"].item() == pytest.approx(100.0)
    expected = 100.0 * out["neuro_features"] @ out["gene_features"].T
    assert torch.allclose(out["logits_per_neuro"], expected, atol=1e-5)


def test_siglip_temperature_and_bias_init():
    model = seq_model(loss="siglip")
    assert model.logit_scale.item() == pytest.approx(math.log(10.0))
    assert model.logit_bias.item() == pytest.approx(-10.0)
    assert seq_model(loss="siglip", logit_scale_init=1.5).logit_scale.item() == pytest.approx(1.5)
    assert seq_model().logit_bias is None and seq_model().logit_scale.item() == pytest.approx(2.6592)
    neuro, genes = cohort(4)
    out = model(neuro, genes)
    expected = 10.0 * out["neuro_features"] @ out["gene_features"].T - 10.0
    assert torch.allclose(out["logits_per_neuro"], expected, atol=1e-5)


def test_fit_frontend_z_scores_the_train_rows():
    model = seq_model()
    neuro, genes = cohort(200)
    model.fit_frontend(neuro, genes)
    z = model._neuro_frontend(neuro)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, correction=0) - 1).abs().max() < 1e-4
    zg = model._gene_frontend(genes)
    assert zg.shape == (200, G, D)
    assert zg.mean(0).abs().max() < 1e-4 and (zg.std(0, correction=0) - 1).abs().max() < 1e-4
    assert bool(model.frontend_fitted)


def identity_error(x: torch.Tensor) -> float:
    x = x.double()
    cov = (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)
    return float((cov - torch.eye(x.shape[1], dtype=torch.float64)).abs().max())


def test_fit_frontend_pca_whitens_train_rows_exact_and_randomized_paths():
    # V = 2100 > 2048 takes the randomized path for the neuro side; genes (D = 10) are exact.
    neuro, genes = cohort(300, v=2100)
    model = seq_model(neuro_input_dim=2100, neuro_pca_dim=6, gene_pca_dim=4)
    model.fit_frontend(neuro, genes)
    x = model._neuro_frontend(neuro)  # (n, 6)
    assert x.shape == (300, 6)
    assert x.mean(0).abs().max() < 1e-4 and identity_error(x) < 1e-4
    xg = model._gene_frontend(genes)  # (n, G, 4)
    assert xg.shape == (300, G, 4)
    for j in range(G):
        assert identity_error(xg[:, j]) < 1e-4
    # The randomized PCA finds the leading subspace: the 6 whitened components carry (nearly) all of
    # the low-rank signal's variance, i.e. their variances before whitening are the top eigenvalues.
    z = ((neuro - model.neuro_mean) / model.neuro_std).double()
    top = torch.linalg.eigvalsh(z @ z.T / 300).flip(0)[:6]  # Gram: same nonzero spectrum, cheaper
    found = 1.0 / model.neuro_pca.double().square().sum(0)  # eigenvalue = 1 / |whitening column|^2
    assert torch.allclose(found, top, rtol=1e-3)


def test_fit_frontend_single_mode_and_determinism():
    neuro, genes = cohort(120, genes_shape=(D,))
    a = single_model(neuro_pca_dim=5, gene_pca_dim=3)
    b = single_model(neuro_pca_dim=5, gene_pca_dim=3)
    a.fit_frontend(neuro, genes)
    b.fit_frontend(neuro, genes)
    assert a.gene_pca.shape == (D, 3) and a.gene_mean.shape == (D,)
    assert identity_error(a._gene_frontend(genes)) < 1e-4
    for name in ("neuro_mean", "neuro_std", "neuro_pca", "gene_mean", "gene_std", "gene_pca"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_fit_frontend_gives_rank_deficient_genes_zero_columns_not_huge_ones():
    """A gene with 3 distinct embeddings has 2 directions of variance; asking for 4 PCA dims must not
    whiten the 2 null directions (that would scale rounding noise, and unseen genotypes, by ~1e6)."""
    neuro, genes = cohort(90)
    genes[:, 0] = torch.randn(3, D)[torch.arange(90) % 3]  # gene 0: three genotypes only
    model = seq_model(gene_pca_dim=4)
    model.fit_frontend(neuro, genes)
    norms = model.gene_pca[0].norm(dim=0)  # (4,) column norms of gene 0's whitening
    assert (norms[:2] > 0).all() and torch.equal(norms[2:], torch.zeros(2))
    held_out = genes[:5].clone()
    held_out[:, 0] += torch.randn(5, D)  # an unseen genotype
    assert model._gene_frontend(held_out).abs().max() < 100
    assert identity_error(model._gene_frontend(genes)[:, 0, :2]) < 1e-4


def test_unfitted_pca_frontend_raises_a_clear_error():
    model = seq_model(neuro_pca_dim=4)
    neuro, genes = cohort(3)
    with pytest.raises(GenealignError, match="fit_frontend"):
        model.encode_neuro(neuro)
    with pytest.raises(GenealignError, match="more than 4"):
        model.fit_frontend(neuro, genes)  # 3 rows cannot give 4 PCA dims
    seq_model().encode_neuro(neuro)  # without PCA the identity normalisation is fine


def fitted(model: MultiGeneAlignmentModel, n: int = 64, **kw):
    neuro, genes = cohort(n, **kw)
    model.fit_frontend(neuro, genes)
    with torch.no_grad():  # move every weight off its init so a lost tensor would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), neuro, genes


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_from_checkpoint_round_trip_gives_identical_encodings(tmp_path, pooling):
    model, neuro, genes = fitted(seq_model(transformer_pooling=pooling, neuro_pca_dim=6, gene_pca_dim=4,
                                           gene_names=[f"G{i}" for i in range(G)], latent_shape=(2, 3, 4)))
    path = tmp_path / "best_model.pt"
    torch.save(checkpoint_payload(model), path)
    loaded = MultiGeneAlignmentModel.from_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.config.gene_names == tuple(f"G{i}" for i in range(G)) and loaded.config.latent_shape == (2, 3, 4)
    with torch.no_grad():
        assert torch.equal(loaded.encode_neuro(neuro), model.encode_neuro(neuro))
        assert torch.equal(loaded.encode_gene(genes), model.encode_gene(genes))


def test_from_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(GenealignError, match="does not exist"):
        MultiGeneAlignmentModel.from_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(GenealignError, match="corrupt.pt"):
        MultiGeneAlignmentModel.from_checkpoint(corrupt)
    model = seq_model()
    truncated = tmp_path / "truncated.pt"
    torch.save(checkpoint_payload(model), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(GenealignError, match="truncated.pt"):
        MultiGeneAlignmentModel.from_checkpoint(truncated)
    bare = tmp_path / "bare.pt"
    torch.save({"model_state_dict": model.state_dict()}, bare)
    with pytest.raises(GenealignError, match="config"):
        MultiGeneAlignmentModel.from_checkpoint(bare)


@pytest.mark.parametrize("projection", ["shared", "per_gene"])
def test_seed_inference_example_loads_a_pca_checkpoint(tmp_path, projection):
    """The seed's example: construct with the seed's arguments (no front-end arguments), then
    load_state_dict(checkpoint['model_state_dict']) of a model trained with PCA."""
    trained, neuro, genes = fitted(seq_model(neuro_pca_dim=6, gene_pca_dim=4, dropout=0.1, gene_projection=projection))
    path = tmp_path / "best_model.pt"
    torch.save(checkpoint_payload(trained), path)

    model = MultiGeneAlignmentModel(
        neuro_input_dim=V, gene_input_dim=D, num_genes=G,
        projection_dim=P, use_transformer=True,
        transformer_hidden_dim=16, transformer_num_layers=2, transformer_num_heads=4,
    )
    checkpoint = torch.load(path)
    model.load_state_dict(checkpoint['model_state_dict'])
    model.eval()
    assert model.config.neuro_pca_dim == 6 and model.config.gene_pca_dim == 4
    assert model.config.gene_projection == projection
    with torch.no_grad():
        neuro_feat = model.encode_neuro(neuro[:1])  # (1, P)
        gene_feat = model.encode_gene(genes[:1])  # (1, P)
        similarity = (neuro_feat * gene_feat).sum()
        assert torch.equal(neuro_feat, trained.encode_neuro(neuro[:1]))
        assert torch.equal(gene_feat, trained.encode_gene(genes[:1]))
    assert -1.0 <= similarity.item() <= 1.0


def test_a_pca_model_adopts_a_plain_state_dict_and_single_mode_too():
    plain, neuro, genes = fitted(single_model(), genes_shape=(D,))
    model = single_model(neuro_pca_dim=5, gene_pca_dim=3)
    model.load_state_dict(plain.state_dict())
    assert model.neuro_pca is None and model.gene_pca is None and model.config.neuro_pca_dim == 0
    with torch.no_grad():
        assert torch.equal(model.eval().encode_gene(genes), plain.encode_gene(genes))
    pca, neuro, genes = fitted(single_model(neuro_pca_dim=5, gene_pca_dim=3), genes_shape=(D,))
    fresh = single_model()
    fresh.load_state_dict(pca.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval().encode_neuro(neuro), pca.encode_neuro(neuro))
        assert torch.equal(fresh.encode_gene(genes), pca.encode_gene(genes))


def test_load_state_dict_still_rejects_a_different_architecture():
    with pytest.raises(RuntimeError):
        seq_model(transformer_num_layers=1).load_state_dict(seq_model().state_dict())


def test_gene_attention_returns_real_weights():
    model, neuro, genes = fitted(seq_model(transformer_pooling="cls"), n=16)
    with torch.no_grad():
        attn = model.gene_attention(genes[:3])
        assert attn.shape == (3, 2, 4, G + 1, G + 1)  # (B, layers, heads, S, S), CLS first
        assert torch.allclose(attn.sum(-1), torch.ones(3, 2, 4, G + 1), atol=1e-5)
        assert (attn >= 0).all() and attn.std() > 0
        # The step-by-step pass computes the same features as the stock encoder.
        features, _ = model.gene_encoder.forward_with_attention(model._gene_frontend(genes[:3]))
        assert torch.allclose(torch.nn.functional.normalize(features, dim=-1), model.encode_gene(genes[:3]), atol=1e-5)
    assert seq_model().gene_attention(genes[:2]).shape == (2, 2, 4, G, G)
    with pytest.raises(GenealignError):
        single_model().gene_attention(genes[:, 0])


def test_param_groups_put_no_decay_params_where_they_belong():
    model = seq_model(transformer_pooling="cls", loss="siglip", neuro_hidden_dim=12)
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names
    for name in ("logit_scale", "logit_bias", "gene_encoder.cls_token", "gene_encoder.norm.weight",
                 "gene_encoder.input_projection.bias", "neuro_encoder.1.weight",
                 "gene_encoder.transformer.layers.0.norm1.weight", "gene_encoder.transformer.layers.0.linear1.bias"):
        assert name in no_decay_names, name
    for name in ("neuro_encoder.0.weight", "gene_encoder.projection.weight", "gene_encoder.input_projection.weight",
                 "gene_encoder.transformer.layers.0.self_attn.in_proj_weight",
                 "gene_encoder.transformer.layers.1.linear2.weight"):
        assert name in decay_names, name
    torch.optim.AdamW(model.param_groups(0.01), lr=1e-3)


def test_model_config_round_trips_through_json_and_rebuilds_the_model():
    cfg = ModelConfig(mode="sequence", neuro_input_dim=V, gene_input_dim=D, num_genes=G, projection_dim=P,
                      transformer_hidden_dim=16, transformer_num_layers=1, transformer_num_heads=2,
                      neuro_pca_dim=4, gene_pca_dim=3, gene_names=tuple(f"G{i}" for i in range(G)),
                      latent_shape=(2, 3, 4), loss="siglip")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    model = MultiGeneAlignmentModel.from_config(cfg)
    assert model.use_transformer and model.config.mode == "sequence" and model.config.use_transformer
    assert model.neuro_pca.shape == (V, 4) and model.gene_pca.shape == (G, D, 3)
    assert MultiGeneAlignmentModel.from_config(model.config).config == model.config
    with pytest.raises(GenealignError, match="unknown keys"):
        ModelConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(GenealignError, match="pooling"):
        seq_model(transformer_pooling="attention")


def test_seed_defaults():
    cfg = ModelConfig()
    assert (cfg.neuro_input_dim, cfg.gene_input_dim, cfg.num_genes, cfg.projection_dim) == (12150, 256, 111, 512)
    assert (cfg.transformer_hidden_dim, cfg.transformer_num_layers, cfg.transformer_num_heads) == (512, 4, 8)
    assert cfg.transformer_pooling == "mean" and cfg.dropout == 0.1 and cfg.logit_scale_init == 2.6592
    assert cfg.neuro_hidden_dim is None and cfg.loss == "clip" and (cfg.neuro_pca_dim, cfg.gene_pca_dim) == (0, 0)
    assert cfg.gene_projection == "shared" and cfg.mode == "single" and not cfg.use_transformer
    layer = seq_model().gene_encoder.transformer.layers[0]
    assert not layer.norm_first and layer.linear1.out_features == 4 * 16 and layer.self_attn.batch_first


def test_encoders_run_under_bf16_autocast_with_a_float32_frontend():
    model, neuro, genes = fitted(seq_model(neuro_pca_dim=6, gene_pca_dim=4), n=32)
    seen = []
    model.neuro_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.encode_gene(genes[:4]).float()
        model.encode_neuro(neuro[:4])
    assert seen == [torch.float32]  # the whitening front-end ran outside autocast
    assert torch.isfinite(feats).all()
    with torch.no_grad():
        assert torch.allclose(feats, model.encode_gene(genes[:4]), atol=0.05)


def test_seed_keywords_and_a_config_build_the_same_model():
    kwargs = dict(neuro_input_dim=V, gene_input_dim=D, num_genes=G, projection_dim=P, use_transformer=True,
                  transformer_hidden_dim=16, transformer_num_layers=2, transformer_num_heads=4, neuro_pca_dim=3)
    cfg = ModelConfig.from_kwargs(**kwargs)
    assert cfg.mode == "sequence" and cfg == ModelConfig(mode="sequence", **kwargs)
    torch.manual_seed(0)
    a = MultiGeneAlignmentModel(**kwargs)
    torch.manual_seed(0)
    b = MultiGeneAlignmentModel(cfg)
    assert a.config == b.config and a.config.use_transformer
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # mode='sequence' alone selects the transformer too
    assert MultiGeneAlignmentModel(ModelConfig(**{**kwargs, "use_transformer": False}, mode="sequence")).use_transformer


def test_unknown_or_positional_constructor_arguments_are_clear_errors():
    with pytest.raises(GenealignError, match=r"unknown argument\(s\) hidden_size.*neuro_input_dim"):
        MultiGeneAlignmentModel(neuro_input_dim=V, hidden_size=4)
    with pytest.raises(GenealignError, match="keyword"):
        MultiGeneAlignmentModel(V)
    with pytest.raises(GenealignError, match="not both"):
        MultiGeneAlignmentModel(ModelConfig(), projection_dim=4)
    with pytest.raises(GenealignError, match="mode"):
        MultiGeneAlignmentModel.from_config(ModelConfig(mode="pairs"))


def test_fit_dims_caps_default_widths_to_a_small_cohort():
    """A (4, 4, 4) latent with 8-wide embeddings: the gpu preset's 256 / 32 PCA widths become 64 / 8."""
    cfg = ModelConfig(mode="sequence", neuro_pca_dim=256, gene_pca_dim=32)
    fit = fit_dims(cfg, neuro_input_dim=64, gene_input_dim=8, num_genes=12, n_train=500)
    assert (fit.neuro_pca_dim, fit.gene_pca_dim) == (64, 8)
    assert (fit.neuro_input_dim, fit.gene_input_dim, fit.num_genes) == (64, 8, 12)
    few = fit_dims(cfg, neuro_input_dim=64, gene_input_dim=8, num_genes=12, n_train=40)
    assert (few.neuro_pca_dim, few.gene_pca_dim) == (39, 8)  # a PCA needs more rows than components
    tiny = fit_dims(cfg, neuro_input_dim=64, gene_input_dim=8, num_genes=12, n_train=6)
    assert (tiny.neuro_pca_dim, tiny.gene_pca_dim) == (5, 5)
    plain = fit_dims(ModelConfig(), neuro_input_dim=64, gene_input_dim=8, num_genes=1, n_train=500)
    assert (plain.neuro_pca_dim, plain.gene_pca_dim) == (0, 0)
    model = MultiGeneAlignmentModel.from_config(fit)
    assert model.neuro_pca.shape == (64, 64) and model.gene_pca.shape == (12, 8, 8)


def test_fit_dims_rejects_an_explicit_width_the_data_cannot_support():
    cfg = ModelConfig(mode="sequence", neuro_pca_dim=256, gene_pca_dim=8)
    with pytest.raises(GenealignError, match=r"--neuro_pca_dim 256 .*64 values.*at most 64") as err:
        fit_dims(cfg, neuro_input_dim=64, gene_input_dim=8, num_genes=12, n_train=500, explicit=frozenset({"neuro_pca_dim"}))
    assert "\n" not in str(err.value)
    with pytest.raises(GenealignError, match=r"--gene_pca_dim 8 .*train split has 5 subjects.*at most 4"):
        fit_dims(cfg, neuro_input_dim=64, gene_input_dim=8, num_genes=12, n_train=5,
                 explicit=frozenset({"gene_pca_dim"}))  # the default neuro width is capped silently
    ok = fit_dims(replace(cfg, neuro_pca_dim=64), neuro_input_dim=64, gene_input_dim=8, num_genes=12, n_train=500,
                  explicit=frozenset({"neuro_pca_dim", "gene_pca_dim"}))
    assert (ok.neuro_pca_dim, ok.gene_pca_dim) == (64, 8)


def test_residualising_model_state_and_errors(tmp_path):
    from pipeline.residualize import design_terms

    groups = {"age": ["age"], "site": ["site=b"]}
    config = ModelConfig(neuro_input_dim=6, gene_input_dim=3, projection_dim=4, neuro_pca_dim=3,
                         covariate_names=("age", "site=b"), residual_terms=design_terms(("age", "site"), groups))
    model = MultiGeneAlignmentModel(config)
    g = torch.Generator().manual_seed(0)
    cov = torch.stack([torch.rand(30, generator=g) * 30 + 50, (torch.rand(30, generator=g) > 0.5).float()], dim=1)  # (n, 2)
    neuro = torch.randn(30, 6, generator=g) + cov[:, :1] / 10
    genes = torch.randn(30, 3, generator=g) - cov[:, 1:]
    with pytest.raises(GenealignError, match="pass covariates="):
        model.fit_frontend(neuro, genes)
    model.fit_frontend(neuro, genes, covariates=cov)
    assert {f"covariate_residualizer.{k}" for k in ("neuro_beta", "gene_beta", "mean", "std")} <= set(model.state_dict())
    path = tmp_path / "m.pt"
    torch.save({"config": {"model": model.config.to_dict()}, "model_state_dict": model.state_dict()}, path)
    loaded = MultiGeneAlignmentModel.from_checkpoint(path)
    assert loaded.config.residual_terms == config.residual_terms
    with torch.no_grad():
        assert torch.equal(loaded.encode_neuro(neuro, covariates=cov), model.eval().encode_neuro(neuro, covariates=cov))
        assert torch.equal(loaded.encode_gene(genes, covariates=cov), model.encode_gene(genes, covariates=cov))
        assert loaded(neuro, genes, covariates=cov)["loss"] is not None
    with pytest.raises(GenealignError, match=r"expects \(30, 2\)"):
        loaded.encode_gene(genes, covariates=cov[:, :1])
    plain = MultiGeneAlignmentModel(neuro_input_dim=6, gene_input_dim=3, projection_dim=4)
    assert not plain.residualizes and not any("beta" in k or "covariate" in k for k in plain.state_dict())
    assert torch.equal(plain.encode_neuro(neuro, covariates=cov), plain.encode_neuro(neuro))  # ignored

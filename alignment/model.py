"""The alignment model: a front-end fitted on the train split, two encoders, a learnable temperature.

Owns `ModelConfig` (the one definition of the model's hyperparameters and their defaults, the seed's;
everything needed to rebuild the model from a checkpoint alone) and `MultiGeneAlignmentModel`, the
seed's model. It is built from a config, `MultiGeneAlignmentModel(cfg)`, or with the seed's keyword
arguments, `MultiGeneAlignmentModel(neuro_input_dim=..., use_transformer=True, ...)`, which go
through `ModelConfig.from_kwargs`:

    single mode     neuro (B, V)    -> front-end -> bias-free Linear (or Linear-LN-GELU-Dropout-Linear) -> L2
                    gene  (B, D)    -> front-end -> bias-free Linear -> L2
    sequence mode   gene  (B, G, D) -> front-end -> Linear -> + sinusoidal position -> post-norm
                    TransformerEncoder (GELU, ff 4x) -> mean | max | cls pooling -> LayerNorm
                    -> bias-free Linear -> L2                     (neuro side as in single mode)

Front-end. With thousands of subjects and 12,150 + 111 x 256 input dimensions a linear encoder on raw
inputs memorises the train split, so every input is first z-scored with train-split statistics and,
optionally, PCA-whitened (`neuro_pca_dim`, per-gene `gene_pca_dim`; `pipeline.normalize` does the
fitting): the encoders then see a few hundred well-conditioned dimensions. The statistics and
projections are buffers (part of the state_dict) sized at construction, filled by
`fit_frontend(neuro, genes)`. `encode_neuro` and `encode_gene` take rows exactly as the store holds
them; normalisation happens inside, in float32 even under autocast (whitening amplifies
small-variance directions, so bf16 inputs would be noisy). With `covariate_names` / `residual_terms`
in the config the front-end first regresses the covariates out of the raw rows (a
`pipeline.residualize.CovariateResidualizer`, fitted by `fit_frontend(neuro, genes, covariates)`);
the encoders then need each subject's raw covariate row: `encode_neuro(x, covariates=c)`.

Checkpoints. `from_checkpoint(path)` rebuilds the model from ckpt["config"]["model"] and loads
ckpt["model_state_dict"]. The seed's inference example (construct with the seed's arguments, then
`load_state_dict`) also works on a checkpoint trained with PCA or per-gene projections: a
load_state_dict pre-hook rebuilds the encoders for the state_dict's front-end (PCA widths read off
the `neuro_pca` / `gene_pca` shapes) before the tensors are copied, so the architecture arguments
must match but the front-end arguments need not.

Temperature. `logit_scale` is the log inverse temperature; the multiplier exp(logit_scale) is clamped
at 100 inside `alignment.loss` (see there). With loss='siglip' a learnable `logit_bias` (init -10) is
added, and logit_scale starts at ln 10 as in the SigLIP paper when `logit_scale_init` is left at the
CLIP default 2.6592 (any other value is used as given).

Attention. PyTorch's encoder layer calls attention with need_weights=False (the seed's forward hook
got None); `gene_attention(genes)` runs the layers step by step with need_weights=True and returns
the real weights, (B, layers, heads, S, S), S = G (G + 1 with cls pooling, CLS at index 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from alignment.loss import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT, clip_loss, exp_logit_scale, siglip_loss
from alignment.encoders import GENE_HEADS, GeneSequenceEncoder, PerGeneLinear, SinusoidalPositionalEncoding  # noqa: F401
from pipeline.errors import GenealignError
from pipeline.normalize import fit_gene_pca, fit_pca, zscore
from pipeline.residualize import CovariateResidualizer, Residualizer

CLIP_LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07), the seed's and CLIP's default
POOLINGS = ("mean", "max", "cls")
LOSSES = ("clip", "siglip")
MODES = ("single", "sequence")
FRONTEND_SEED = 0  # fixed: the same train rows always give the same front-end


@dataclass
class ModelConfig:
    """The model's shape. `mode` and `use_transformer` both exist for the seed's sake: either
    mode='sequence' or use_transformer=True selects the transformer (sequence) model."""

    mode: str = "single"  # 'single' | 'sequence'
    neuro_input_dim: int = 12150
    gene_input_dim: int = 256
    num_genes: int = 111
    projection_dim: int = 512
    use_transformer: bool = False
    transformer_hidden_dim: int = 512
    transformer_num_layers: int = 4
    transformer_num_heads: int = 8
    transformer_pooling: str = "mean"
    neuro_hidden_dim: int | None = None
    dropout: float = 0.1
    # log inverse temperature at init; with loss='siglip' the CLIP default becomes ln 10 (SigLIP paper)
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    loss: str = "clip"  # 'clip' | 'siglip'
    neuro_pca_dim: int = 0  # 0 = z-scoring only
    gene_pca_dim: int = 0  # per gene; 0 = z-scoring only
    # Sequence mode's input projection: 'shared' (the seed's one Linear for every gene) or 'per_gene'
    # (each gene its own Linear, so the model can weigh causal genes and silence noise genes before
    # pooling instead of relying on positions to tell genes apart).
    gene_projection: str = "shared"
    # Sequence mode's read-out of the pooled features: 'linear' (the seed's) or 'quadratic' (plus a
    # linear map of their pairwise products; `alignment.encoders`).
    gene_head: str = "linear"
    gene_names: tuple[str, ...] | None = None
    latent_shape: tuple[int, ...] | None = None
    # Covariate residualisation (`pipeline.residualize`), fitted by fit_frontend before z-scoring/PCA:
    # the columns of the `covariates` rows the encoders take (the training store's covariate_names,
    # in order) and the design terms, each a product of those columns (() = intercept). None = off.
    covariate_names: tuple[str, ...] | None = None
    residual_terms: tuple[tuple[str, ...], ...] | None = None

    def to_dict(self) -> dict:
        """Plain JSON / torch.load(weights_only=True)-safe dict (tuples become lists)."""
        out = asdict(self)
        for key in ("gene_names", "latent_shape", "covariate_names"):
            if out[key] is not None:
                out[key] = list(out[key])
        if out["residual_terms"] is not None:
            out["residual_terms"] = [list(term) for term in out["residual_terms"]]
        return out

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ModelConfig":
        """The seed's constructor keywords as a config (the mode follows `use_transformer` unless
        given); an unknown name is a GenealignError listing the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise GenealignError(
                f"MultiGeneAlignmentModel got unknown argument(s) {', '.join(unknown)}; the known ones are "
                f"{', '.join(known)}."
            )
        kwargs.setdefault("mode", "sequence" if kwargs.get("use_transformer") else "single")
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GenealignError(
                f"Model config has unknown keys {unknown} (known: {sorted(known)}); the checkpoint was "
                "written by another genealign version: retrain or load it with that version."
            )
        return cls(**_as_tuples(data))


TUPLE_FIELDS = (("gene_names", str), ("latent_shape", int), ("covariate_names", str))


def _as_tuples(values: dict) -> dict:
    """`values` with the config's tuple fields as tuples of their type (they arrive as JSON lists)."""
    values = dict(values)
    for key, cast in TUPLE_FIELDS:
        if values.get(key) is not None:
            values[key] = tuple(cast(v) for v in values[key])
    if values.get("residual_terms") is not None:
        values["residual_terms"] = tuple(tuple(str(c) for c in term) for term in values["residual_terms"])
    return values


def _xavier_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _projection_head(in_dim: int, out_dim: int, hidden_dim: int | None, dropout: float) -> nn.Module:
    """Bias-free Linear, or the seed's optional hidden layer: Linear, LayerNorm, GELU, Dropout, Linear.
    (The first Linear has no bias either: the LayerNorm right after it would cancel it.)"""
    if not hidden_dim:
        return nn.Linear(in_dim, out_dim, bias=False)
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.LayerNorm(hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


class MultiGeneAlignmentModel(nn.Module):
    """CLIP-style model aligning brain latents (B, V) with gene embeddings ((B, D) single mode,
    (B, G, D) sequence mode). See the module docstring for the architecture and the front-end."""

    def __init__(self, config: ModelConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = ModelConfig.from_kwargs(**kwargs)
        elif not isinstance(config, ModelConfig) or kwargs:
            raise GenealignError(
                "MultiGeneAlignmentModel takes a ModelConfig or the seed's keyword arguments "
                "(neuro_input_dim=..., use_transformer=..., ...), not both and not positional values."
            )
        cfg = self._config = _resolved(config)
        self.use_transformer = cfg.use_transformer
        self.loss_type = cfg.loss
        gene_shape = (cfg.num_genes, cfg.gene_input_dim) if cfg.use_transformer else (cfg.gene_input_dim,)
        k_neuro, k_gene = cfg.neuro_pca_dim, cfg.gene_pca_dim

        # Front-end buffers: identity normalisation until fit_frontend / load_state_dict fills them.
        self.register_buffer("neuro_mean", torch.zeros(cfg.neuro_input_dim))  # (V,)
        self.register_buffer("neuro_std", torch.ones(cfg.neuro_input_dim))  # (V,)
        self.register_buffer("gene_mean", torch.zeros(gene_shape))  # (G, D) | (D,)
        self.register_buffer("gene_std", torch.ones(gene_shape))  # (G, D) | (D,)
        self.register_buffer("frontend_fitted", torch.tensor(False))
        self.register_buffer("neuro_pca", torch.zeros(cfg.neuro_input_dim, k_neuro) if k_neuro else None)  # (V, kN)
        self.register_buffer("gene_pca", torch.zeros(*gene_shape, k_gene) if k_gene else None)  # (G, D, kG) | (D, kG)
        self._frontend_ready = False  # python mirror of frontend_fitted: no device sync per batch
        self.covariate_residualizer = None if cfg.residual_terms is None else CovariateResidualizer(
            cfg.covariate_names, cfg.residual_terms, {"neuro": (cfg.neuro_input_dim,), "gene": gene_shape})

        self.neuro_encoder = _projection_head(
            k_neuro or cfg.neuro_input_dim, cfg.projection_dim, cfg.neuro_hidden_dim, cfg.dropout
        )
        if cfg.use_transformer:
            self.gene_encoder = GeneSequenceEncoder(
                k_gene or cfg.gene_input_dim,
                cfg.num_genes,
                cfg.transformer_hidden_dim,
                cfg.transformer_num_layers,
                cfg.transformer_num_heads,
                cfg.transformer_pooling,
                cfg.projection_dim,
                cfg.dropout,
                cfg.gene_projection,
                cfg.gene_head,
            )
        else:
            self.gene_encoder = nn.Linear(k_gene or cfg.gene_input_dim, cfg.projection_dim, bias=False)
        _xavier_init(self)
        if cfg.use_transformer and cfg.transformer_pooling == "cls":
            nn.init.normal_(self.gene_encoder.cls_token, std=0.02)

        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        if cfg.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_LOGIT_BIAS_INIT))
        else:
            self.logit_bias = None
        self.register_load_state_dict_pre_hook(_adopt_frontend)

    # ----------------------------------------------------------------------------------- config
    @property
    def config(self) -> ModelConfig:
        return replace(self._config)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "MultiGeneAlignmentModel":
        return cls(config)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "MultiGeneAlignmentModel":
        """The trained model of a genealign checkpoint (config + weights + front-end), in eval mode."""
        path = Path(path)
        if not path.is_file():
            raise GenealignError(
                f"Checkpoint {path} does not exist; pass a best_model.pt / last.pt written by `genealign train`."
            )
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated file, not a torch file, pickled objects
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GenealignError(
                f"Checkpoint {path} cannot be read ({type(exc).__name__}: {reason[:200]}); it is corrupt, "
                "truncated or not a genealign checkpoint: copy it again or retrain."
            ) from exc
        config = ckpt.get("config") if isinstance(ckpt, dict) else None
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "model_state_dict" not in ckpt:
            raise GenealignError(
                f"Checkpoint {path} has no config['model'] and model_state_dict; it was not written by "
                "`genealign train` (a predecessor checkpoint needs its constructor arguments: build "
                "MultiGeneAlignmentModel(...) yourself and call load_state_dict)."
            )
        model = cls.from_config(ModelConfig.from_dict(config["model"]))
        try:
            model.load_state_dict(ckpt["model_state_dict"])
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()
            raise GenealignError(
                f"Checkpoint {path}: model_state_dict does not fit its config['model'] "
                f"({' '.join(r.strip() for r in reason[:3])[:300]}); the file is inconsistent: retrain."
            ) from exc
        return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()

    # ------------------------------------------------------------------------------ residualiser
    @property
    def residualizes(self) -> bool:
        """Whether the encoders regress covariates out of their inputs (then they need `covariates`)."""
        return self.covariate_residualizer is not None

    def residualizer(self) -> Residualizer | None:
        """The fitted term spec and standardisation (numpy), for residualising other features alike."""
        return self.covariate_residualizer.spec() if self.residualizes else None

    def residualize_neuro(self, neuro: torch.Tensor, covariates=None) -> torch.Tensor:
        """Raw rows (B, V) minus their covariates' fitted part (unchanged when the model residualises nothing)."""
        return self.covariate_residualizer(neuro, covariates, "neuro") if self.residualizes else neuro

    def residualize_genes(self, genes: torch.Tensor, covariates=None) -> torch.Tensor:
        """Raw rows (B, G, D) | (B, D) minus their covariates' fitted part."""
        return self.covariate_residualizer(genes, covariates, "gene") if self.residualizes else genes

    # -------------------------------------------------------------------------------- front-end
    def _check_neuro(self, neuro: torch.Tensor) -> torch.Tensor:
        v = self._config.neuro_input_dim
        if neuro.dim() < 2 or math.prod(neuro.shape[1:]) != v:
            raise GenealignError(
                f"Neuro input has shape {tuple(neuro.shape)}; the model expects (B, {v}) rows (flattened "
                "latents, as the store returns them). Check that the store matches the checkpoint."
            )
        return neuro.reshape(neuro.shape[0], v)

    def _check_genes(self, genes: torch.Tensor) -> torch.Tensor:
        cfg = self._config
        if cfg.use_transformer:
            want = (cfg.num_genes, cfg.gene_input_dim)
            hint = "all genes of the store in the model's gene order"
        else:
            want = (cfg.gene_input_dim,)
            hint = "one gene's embedding per row: genes[:, store.gene_index(name)]"
        if tuple(genes.shape[1:]) != want:
            raise GenealignError(
                f"Gene input has shape {tuple(genes.shape)}; this {cfg.mode}-mode model expects (B, "
                f"{', '.join(map(str, want))}) ({hint})."
            )
        return genes

    def _require_fitted(self) -> None:
        cfg = self._config
        if (cfg.neuro_pca_dim or cfg.gene_pca_dim or self.residualizes) and not self._frontend_ready:
            raise GenealignError(
                f"The model's PCA front-end (neuro_pca_dim={cfg.neuro_pca_dim}, gene_pca_dim="
                f"{cfg.gene_pca_dim}) is not fitted: call model.fit_frontend(neuro, genes) on the train "
                "split first, or load a trained model with MultiGeneAlignmentModel.from_checkpoint(path)."
            )

    @torch.no_grad()
    def fit_frontend(self, neuro: torch.Tensor, genes: torch.Tensor, covariates=None) -> None:
        """Fit the covariate residualiser (when the config has one; on the raw rows), then z-scoring
        (and PCA whitening where the pca dims are > 0) of the residuals, on train-split rows.

        neuro (n, V) and genes (n, G, D) [sequence] or (n, D) [single], raw store values; covariates
        (n, C) raw rows in config.covariate_names order (needed only by a residualising model). Runs
        on the inputs' device; deterministic (fixed generator seed); float64 accumulation of the
        moments and covariances (`pipeline.normalize`)."""
        neuro = self._check_neuro(neuro)
        genes = self._check_genes(genes)
        cfg = self._config
        n = neuro.shape[0]
        if genes.shape[0] != n:
            raise GenealignError(
                f"fit_frontend got {n} neuro rows but {genes.shape[0]} gene rows; pass the same subjects."
            )
        k_max = max(cfg.neuro_pca_dim, cfg.gene_pca_dim)
        if n < 2 or n <= k_max:
            raise GenealignError(
                f"fit_frontend got {n} train rows; z-scoring needs >= 2 and a PCA of {k_max} dims needs more "
                f"than {k_max}: ingest more subjects or lower --neuro_pca_dim / --gene_pca_dim."
            )
        work = torch.float64 if neuro.dtype == torch.float64 else torch.float32
        neuro, genes = neuro.to(work), genes.to(work)  # no copy unless float16 / bfloat16 rows
        if self.residualizes:
            self.covariate_residualizer.fit(covariates, {"neuro": neuro, "gene": genes})
            neuro, genes = self.residualize_neuro(neuro, covariates), self.residualize_genes(genes, covariates)
        generator = torch.Generator(device=neuro.device).manual_seed(FRONTEND_SEED)
        mean, std, whitening = fit_pca(neuro, cfg.neuro_pca_dim, generator)  # (V,), (V,), (V, kN) | None
        self.neuro_mean.copy_(mean)
        self.neuro_std.copy_(std)
        if whitening is not None:
            self.neuro_pca.copy_(whitening)
        mean, std, whitening = fit_gene_pca(genes.reshape(n, -1, cfg.gene_input_dim), cfg.gene_pca_dim)  # (G, D, kG)
        self.gene_mean.copy_(mean.reshape(self.gene_mean.shape))
        self.gene_std.copy_(std.reshape(self.gene_std.shape))
        if whitening is not None:
            self.gene_pca.copy_(whitening.reshape(self.gene_pca.shape))
        self.frontend_fitted.fill_(True)
        self._frontend_ready = True

    def _neuro_frontend(self, neuro: torch.Tensor, covariates=None) -> torch.Tensor:
        x = zscore(self.residualize_neuro(neuro, covariates), self.neuro_mean, self.neuro_std)  # (B, V)
        if self.neuro_pca is not None:
            x = x @ self.neuro_pca  # (B, kN)
        return x

    def _gene_frontend(self, genes: torch.Tensor, covariates=None) -> torch.Tensor:
        x = zscore(self.residualize_genes(genes, covariates), self.gene_mean, self.gene_std)  # (B, G, D) | (B, D)
        if self.gene_pca is not None:
            if self.use_transformer:
                x = torch.einsum("bgd,gdk->bgk", x, self.gene_pca)  # (B, G, kG)
            else:
                x = x @ self.gene_pca  # (B, kG)
        return x

    @staticmethod
    def _no_autocast(x: torch.Tensor):
        return torch.autocast(device_type=x.device.type, enabled=False)

    # --------------------------------------------------------------------------------- encoders
    def encode_neuro(self, neuro: torch.Tensor, normalize: bool = True, *, covariates=None) -> torch.Tensor:
        """Raw store rows (B, V) -> features (B, P), unit-norm when `normalize`. `covariates` (B, C):
        the subjects' raw covariate rows, required by a residualising model, ignored otherwise."""
        neuro = self._check_neuro(neuro)
        self._require_fitted()
        with self._no_autocast(neuro):
            x = self._neuro_frontend(neuro.to(self.neuro_mean.dtype), covariates)
        features = self.neuro_encoder(x)  # (B, P)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_gene(self, genes: torch.Tensor, normalize: bool = True, *, covariates=None) -> torch.Tensor:
        """Raw store rows (B, G, D) [sequence] or (B, D) [single] -> features (B, P); `covariates` as
        in encode_neuro."""
        genes = self._check_genes(genes)
        self._require_fitted()
        with self._no_autocast(genes):
            x = self._gene_frontend(genes.to(self.gene_mean.dtype), covariates)
        features = self.gene_encoder(x)  # (B, P)
        return F.normalize(features, dim=-1) if normalize else features

    def gene_attention(self, genes: torch.Tensor, covariates=None) -> torch.Tensor:
        """Real gene-gene attention weights, (B, layers, heads, S, S), rows = queries, summing to 1
        over the last (key) axis; S = G, or G + 1 with cls pooling (CLS at index 0). Sequence mode
        only. Call in eval mode (in train mode dropout is applied as in training) under no_grad."""
        if not self.use_transformer:
            raise GenealignError("gene_attention needs a sequence-mode model (use_transformer=True).")
        genes = self._check_genes(genes)
        self._require_fitted()
        with self._no_autocast(genes):
            x = self._gene_frontend(genes.to(self.gene_mean.dtype), covariates)
        return self.gene_encoder.forward_with_attention(x)[1]

    def gene_input_weight(self) -> nn.Parameter | None:
        """The per-gene input projection's weight, (G, d_in, H): row g is how gene g enters the
        transformer, so a gene whose block is all zeros is not used at all. None unless sequence mode
        with gene_projection='per_gene' (a shared projection has no per-gene weights)."""
        if self.use_transformer and isinstance(self.gene_encoder.input_projection, PerGeneLinear):
            return self.gene_encoder.input_projection.weight
        return None

    # ----------------------------------------------------------------------------------- loss
    def loss_parameters(self) -> list[nn.Parameter]:
        """Parameters used by the loss only (not by the encoders): the temperature and siglip bias."""
        return [self.logit_scale] + ([self.logit_bias] if self.logit_bias is not None else [])

    def contrastive_loss(self, neuro_features: torch.Tensor, gene_features: torch.Tensor) -> torch.Tensor:
        """The configured loss (clip | siglip) of normalised features (N, P), row i matching row i."""
        if self.loss_type == "siglip":
            return siglip_loss(neuro_features, gene_features, self.logit_scale, self.logit_bias)
        return clip_loss(neuro_features, gene_features, self.logit_scale)

    def forward(self, neuro: torch.Tensor, genes: torch.Tensor, return_loss: bool = True, *, covariates=None) -> dict:
        """dict(neuro_features (B, P), gene_features (B, P), logits_per_neuro (B, B), logits_per_gene
        (B, B), logit_scale (the clamped multiplier exp(logit_scale)), loss (None unless return_loss)).
        `covariates` (B, C) as in encode_neuro."""
        neuro_features = self.encode_neuro(neuro, covariates=covariates)
        gene_features = self.encode_gene(genes, covariates=covariates)
        scale = exp_logit_scale(self.logit_scale)
        logits_per_neuro = scale * neuro_features @ gene_features.T  # (B, B)
        if self.logit_bias is not None:
            logits_per_neuro = logits_per_neuro + self.logit_bias
        return {
            "neuro_features": neuro_features,
            "gene_features": gene_features,
            "logits_per_neuro": logits_per_neuro,
            "logits_per_gene": logits_per_neuro.T,
            "logit_scale": scale,
            "loss": self.contrastive_loss(neuro_features, gene_features) if return_loss else None,
        }

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on matrices only; none on biases, norms, the temperature, the
        siglip bias, the CLS token and positional parameters."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if param.dim() < 2 or leaf in ("cls_token", "logit_scale", "logit_bias") or "position" in name:
                no_decay.append(param)
            else:
                decay.append(param)
        return [
            {"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def _resolved(cfg: ModelConfig) -> ModelConfig:
    """`cfg` as the model uses it: types coerced, mode and use_transformer agreeing (either selects
    the sequence model), the SigLIP temperature when the CLIP default was left; validated."""
    if cfg.mode not in MODES:
        raise GenealignError(f"Model mode {cfg.mode!r} is not one of {MODES}.")
    sequence = cfg.mode == "sequence" or bool(cfg.use_transformer)
    logit_scale_init = float(cfg.logit_scale_init)
    if cfg.loss == "siglip" and logit_scale_init == CLIP_LOGIT_SCALE_INIT:
        logit_scale_init = SIGLIP_LOGIT_SCALE_INIT
    ints = ("neuro_input_dim", "gene_input_dim", "num_genes", "projection_dim", "transformer_hidden_dim",
            "transformer_num_layers", "transformer_num_heads", "neuro_pca_dim", "gene_pca_dim")
    cfg = replace(
        cfg,
        **_as_tuples({key: getattr(cfg, key) for key in ("gene_names", "latent_shape", "covariate_names", "residual_terms")}),
        **{name: int(getattr(cfg, name)) for name in ints},
        mode="sequence" if sequence else "single",
        use_transformer=sequence,
        neuro_hidden_dim=int(cfg.neuro_hidden_dim) if cfg.neuro_hidden_dim else None,
        dropout=float(cfg.dropout),
        logit_scale_init=logit_scale_init,
    )
    _validate(cfg)
    return cfg


def _adopt_frontend(model: MultiGeneAlignmentModel, state_dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: rebuild `model` for the state_dict's front-end (PCA widths from the
    neuro_pca / gene_pca shapes, shared or per-gene input projection) before its tensors are copied.

    The seed's example constructs the model with the seed's arguments and then loads a checkpoint
    that may have been trained with PCA, whose buffers and input layers have other shapes than a
    plain load can fill. A partial state_dict without the front-end (strict=False) changes nothing."""
    if prefix + "neuro_mean" not in state_dict:
        return
    cfg = model._config
    neuro_pca = state_dict.get(prefix + "neuro_pca")
    gene_pca = state_dict.get(prefix + "gene_pca")
    projection = state_dict.get(prefix + "gene_encoder.input_projection.weight")  # (G, d_in, H) per gene
    derived = replace(
        cfg,
        neuro_pca_dim=int(neuro_pca.shape[-1]) if neuro_pca is not None and neuro_pca.dim() == 2 else 0,
        gene_pca_dim=int(gene_pca.shape[-1]) if gene_pca is not None and gene_pca.dim() == model.gene_mean.dim() + 1 else 0,
    )
    if cfg.use_transformer and projection is not None:
        derived = replace(derived, gene_projection="per_gene" if projection.dim() == 3 else "shared",
                          gene_head="quadratic" if prefix + "gene_encoder.quadratic.weight" in state_dict else "linear")
    if derived != cfg:
        like = model.logit_scale
        fresh = type(model)(derived).to(device=like.device, dtype=like.dtype)
        model._config = fresh._config
        for name, child in fresh.named_children():
            setattr(model, name, child)
        for name in ("neuro_pca", "gene_pca"):
            model.register_buffer(name, getattr(fresh, name))
    fitted = state_dict.get(prefix + "frontend_fitted")
    if fitted is not None:
        model._frontend_ready = bool(fitted)


def _validate(cfg: ModelConfig) -> None:
    def bad(message: str) -> None:
        raise GenealignError(message)

    if cfg.loss not in LOSSES:
        bad(f"loss {cfg.loss!r} is not one of {LOSSES}.")
    if cfg.transformer_pooling not in POOLINGS:
        bad(f"transformer_pooling {cfg.transformer_pooling!r} is not one of {POOLINGS}.")
    if cfg.gene_projection not in ("shared", "per_gene"):
        bad(f"gene_projection {cfg.gene_projection!r} is not one of ('shared', 'per_gene').")
    if cfg.gene_head not in GENE_HEADS:
        bad(f"gene_head {cfg.gene_head!r} is not one of {GENE_HEADS}.")
    for name in ("neuro_input_dim", "gene_input_dim", "num_genes", "projection_dim"):
        if getattr(cfg, name) < 1:
            bad(f"{name} must be >= 1, got {getattr(cfg, name)}.")
    if not 0 <= cfg.neuro_pca_dim <= cfg.neuro_input_dim:
        bad(f"neuro_pca_dim {cfg.neuro_pca_dim} must be in [0, neuro_input_dim={cfg.neuro_input_dim}].")
    if not 0 <= cfg.gene_pca_dim <= cfg.gene_input_dim:
        bad(f"gene_pca_dim {cfg.gene_pca_dim} must be in [0, gene_input_dim={cfg.gene_input_dim}].")
    if not 0.0 <= cfg.dropout < 1.0:
        bad(f"dropout {cfg.dropout} must be in [0, 1).")
    if cfg.use_transformer:
        if cfg.transformer_hidden_dim % cfg.transformer_num_heads:
            bad(
                f"transformer_hidden_dim {cfg.transformer_hidden_dim} must be divisible by "
                f"transformer_num_heads {cfg.transformer_num_heads}."
            )
        if cfg.gene_names is not None and len(cfg.gene_names) != cfg.num_genes:
            bad(f"{len(cfg.gene_names)} gene_names given for num_genes={cfg.num_genes}.")
    if (cfg.residual_terms is None) != (cfg.covariate_names is None) or not set(
            c for term in cfg.residual_terms or () for c in term) <= set(cfg.covariate_names or ()):
        bad("residual_terms and covariate_names go together, and every term's columns must be covariate_names.")
    if cfg.latent_shape is not None and math.prod(cfg.latent_shape) != cfg.neuro_input_dim:
        bad(
            f"latent_shape {cfg.latent_shape} has {math.prod(cfg.latent_shape)} values, not "
            f"neuro_input_dim={cfg.neuro_input_dim}."
        )


def fit_dims(cfg: ModelConfig, *, neuro_input_dim: int, gene_input_dim: int, num_genes: int, n_train: int,
             explicit: frozenset = frozenset()) -> ModelConfig:
    """`cfg` with the data's input shapes and PCA widths the data can support.

    A width that came from a default or preset (not in `explicit`) is capped at the input width and
    at n_train - 1 (a PCA needs more rows than components); an explicit one that does not fit is a
    GenealignError naming the flag and the limit."""
    cfg = replace(cfg, neuro_input_dim=int(neuro_input_dim), gene_input_dim=int(gene_input_dim), num_genes=int(num_genes))
    limits = {
        "neuro_pca_dim": (neuro_input_dim, f"the brain latent has {neuro_input_dim} values"),
        "gene_pca_dim": (gene_input_dim, f"the gene embeddings are {gene_input_dim} wide"),
    }
    for name, (width, why) in limits.items():
        value = getattr(cfg, name)
        rows_cap = max(n_train - 1, 0)
        cap = min(width, rows_cap)
        if value <= cap:
            continue
        if name in explicit:
            reason = why if value > width else f"the train split has {n_train} subjects (a PCA needs more rows than components)"
            raise GenealignError(f"--{name} {value} does not fit the data: {reason}; use at most {cap}, or 0 for z-scoring only.")
        cfg = replace(cfg, **{name: cap})
    return cfg

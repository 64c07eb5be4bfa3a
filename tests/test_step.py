"""contrastive_step: K micro-batches (and 2 processes) give exactly the gradient of one big batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _ddp_worker
from alignment import MultiGeneAlignmentModel, contrastive_step

V, D, G, P = 12, 6, 3, 8


def build(mode: str, loss: str = "clip", dropout: float = 0.0, pooling: str = "mean") -> MultiGeneAlignmentModel:
    torch.manual_seed(0)
    sequence = mode == "sequence"
    model = MultiGeneAlignmentModel(
        neuro_input_dim=V, gene_input_dim=D, num_genes=G if sequence else 1, projection_dim=P,
        use_transformer=sequence, transformer_hidden_dim=8, transformer_num_layers=2, transformer_num_heads=2,
        transformer_pooling=pooling, neuro_hidden_dim=10 if not sequence else None, dropout=dropout, loss=loss,
        neuro_pca_dim=5, gene_pca_dim=4,
    ).double()
    neuro, genes = batch(mode, 64, seed=5)
    model.fit_frontend(neuro, genes)
    return model


def batch(mode: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    neuro = torch.randn(n, V, generator=g, dtype=torch.float64)
    shape = (G, D) if mode == "sequence" else (D,)
    genes = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return neuro, genes + 0.5 * neuro[:, :D].reshape(n, *([1] * (len(shape) - 1)), D)  # some shared signal


def split(neuro, genes, k):
    b = len(neuro) // k
    return [(neuro[i * b : (i + 1) * b], genes[i * b : (i + 1) * b]) for i in range(k)]


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def full_batch_reference(model, neuro, genes) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(neuro, genes)["loss"]
    loss.backward()
    return loss.item(), grads(model)


def micro_batch_reference(model, micro) -> tuple[float, dict]:
    """Encode each micro-batch with grad (all graphs kept, the memory-hungry way), one loss."""
    model.zero_grad(set_to_none=True)
    feats = [(model.encode_neuro(n), model.encode_gene(g)) for n, g in micro]
    loss = model.contrastive_loss(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]))
    loss.backward()
    return loss.item(), grads(model)


def assert_same(got: dict, want: dict, rtol=1e-9, atol=1e-12):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=rtol, atol=atol), name


CASES = [
    ("single", "clip", "mean"),
    ("sequence", "clip", "mean"),
    ("sequence", "clip", "cls"),
    ("single", "siglip", "mean"),
    ("sequence", "siglip", "max"),
]


@pytest.mark.parametrize("mode,loss,pooling", CASES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_micro_batches_give_the_full_batch_gradient(mode, loss, pooling, k):
    model = build(mode, loss, pooling=pooling)
    neuro, genes = batch(mode, 16)
    want_loss, want = full_batch_reference(model, neuro, genes)
    model.zero_grad(set_to_none=True)
    got_loss = contrastive_step(model, split(neuro, genes, k))
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    assert_same(grads(model), want)  # every parameter, the temperature (and siglip bias) included


@pytest.mark.parametrize("mode", ["single", "sequence"])
def test_dropout_masks_are_replayed_in_the_second_pass(mode):
    model = build(mode, dropout=0.3)
    neuro, genes = batch(mode, 12)
    micro = split(neuro, genes, 3)
    torch.manual_seed(123)
    want_loss, want = micro_batch_reference(model, micro)
    state_after_reference = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    got_loss = contrastive_step(model, micro)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    assert_same(grads(model), want)
    # The RNG ends where encoding each micro-batch once leaves it, so training stays reproducible.
    assert torch.equal(torch.get_rng_state(), state_after_reference)


def test_temperature_gradient_is_not_k_times_too_large_nor_seed_averaged():
    model = build("single")
    neuro, genes = batch("single", 16)
    _, want = full_batch_reference(model, neuro, genes)
    # The seed's accumulation: mean of per-micro-batch losses (negatives within a micro-batch only).
    model.zero_grad(set_to_none=True)
    for n, g in split(neuro, genes, 4):
        (model(n, g)["loss"] / 4).backward()
    seed_style = grads(model)
    assert not torch.allclose(seed_style["logit_scale"], want["logit_scale"], rtol=1e-3)
    model.zero_grad(set_to_none=True)
    contrastive_step(model, split(neuro, genes, 4))
    assert torch.allclose(model.logit_scale.grad, want["logit_scale"], rtol=1e-10)


def test_gradients_accumulate_across_calls():
    model = build("sequence")
    neuro, genes = batch("sequence", 8)
    model.zero_grad(set_to_none=True)
    contrastive_step(model, split(neuro, genes, 2))
    once = grads(model)
    contrastive_step(model, split(neuro, genes, 2))
    assert_same(grads(model), {name: 2 * g for name, g in once.items()})


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model = build("sequence").float()
    neuro, genes = (t.float() for t in batch("sequence", 16))
    model.zero_grad(set_to_none=True)
    exact = contrastive_step(model, split(neuro, genes, 2))
    want = grads(model)
    model.zero_grad(set_to_none=True)
    approx = contrastive_step(model, split(neuro, genes, 2), autocast_dtype=torch.bfloat16)
    assert approx == pytest.approx(exact, rel=0.05)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads(model).values()]), torch.cat([g.flatten() for g in want.values()]), dim=0
    )
    assert cos > 0.95


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_global_batch_gradient(tmp_path):
    world = 2
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("_ddp_worker.py")
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(tmp_path)],
                         env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    for name, use_transformer, loss_name, k in _ddp_worker.CASES:
        model = _ddp_worker.build(use_transformer, loss_name)
        neuro, genes = _ddp_worker.global_batch(use_transformer, world * k * _ddp_worker.B)
        want_loss, want = full_batch_reference(model, neuro, genes)
        for r in range(world):
            got = ranks[r][name]
            assert got["loss"] == pytest.approx(want_loss, rel=1e-12), (name, r)
            assert_same(got["grads"], want)
            assert_same(got["accumulated"], {n: 2 * g for n, g in want.items()})

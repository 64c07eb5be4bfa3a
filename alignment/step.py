"""One optimizer step's worth of gradients for a contrastive model, with correct accumulation.

`contrastive_step(model, micro_batches)` leaves in `.grad` exactly the gradient of the loss over the
whole accumulated batch (K micro-batches of B rows: every row's negatives are all K*B rows of the
other modality), and under torch.distributed over the global batch of world*K*B rows, while holding
only one micro-batch's activations at a time. It is the gradient cache of Gao et al. 2021
("Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):

  pass 1  encode every micro-batch without grad, keeping its features (K*B, P) and the RNG state
          it started from;
  loss    all_gather the features of all ranks, put this rank's own features back into its slot as
          leaves that require grad, compute the loss once over the whole batch and backprop it: this
          gives d loss / d features for this rank's rows, and the exact gradient of the temperature
          (and the siglip bias), which are used by the loss only;
  pass 2  re-encode each micro-batch with grad from its saved RNG state (so dropout draws the same
          masks as in pass 1) and backprop the cached feature gradients into the encoders.

The seed instead averaged per-micro-batch losses (negatives never spanned the accumulated batch),
and a well-known CLIP trainer sums per-micro-batch temperature gradients (K x too large); here the
temperature sees the loss once. With K = 1 there is no second pass: one forward with grad (on one
process a plain forward/backward).

Distributed (distributed=True; the caller has initialised torch.distributed; the model is NOT wrapped
in DistributedDataParallel: this function does the gradient reduction itself). Every rank computes
the same global loss L over all world*K*B rows. Rank r's backward yields g_r = sum over its own rows
i of dL/df_i * df_i/dtheta for the encoder parameters; the global gradient is dL/dtheta = sum_r g_r,
so encoder gradients are all-reduced with SUM. The temperature (and bias) gradient dL/dt is already
complete, and identical, on every rank, so it is averaged (SUM of dL/dt / world): summing it would
make it world x too large. The result on every rank equals the one-process gradient of the global
batch loss. `.grad` already present before the call (accumulation across calls) is kept out of the
reduction and added back, so it is not multiplied by the world size. Every rank must pass the same
number of rows (the loader's drop_last shards guarantee it).
"""

from __future__ import annotations

import torch

from alignment.embed import autocast as _autocast


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _encode(model, batch, device, autocast_dtype, loss_dtype):
    neuro, genes, *rest = batch  # rest: the covariates (B, C) of a residualising model's batch
    covariates = rest[0] if rest else None
    with _autocast(device, autocast_dtype):
        neuro_features = model.encode_neuro(neuro, covariates=covariates)  # (B, P)
        gene_features = model.encode_gene(genes, covariates=covariates)  # (B, P)
    # The loss runs outside autocast on full-precision features (bf16 logits would blur the softmax).
    return neuro_features.to(loss_dtype), gene_features.to(loss_dtype)


def _gather_rows(local: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """All ranks' rows (world*n, P); the other ranks' are constants, this rank's slot is `local`."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[rank] = local
    return torch.cat(parts)


def _all_reduce_gradients(model, world: int) -> None:
    """Encoder grads: SUM over ranks; loss-only params (temperature, bias): average. One all_reduce
    per dtype over a flat buffer."""
    import torch.distributed as dist

    loss_only = {id(p) for p in model.loss_parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        if id(p) in loss_only:
            p.grad.div_(world)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        group = [p for p in params if p.grad.dtype == dtype]
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def contrastive_step(model, micro_batches, *, autocast_dtype=None, distributed=False) -> float:
    """Accumulate into `.grad` the gradient of the contrastive loss over all `micro_batches`
    (a list of (neuro (B, V), genes (B, G, D) | (B, D)[, covariates (B, C)]) on the model's device) and, when
    `distributed`, over all ranks' micro-batches; returns that loss. The caller clips and steps."""
    if not micro_batches:
        raise ValueError("contrastive_step needs at least one micro-batch")
    world, rank = 1, 0
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("contrastive_step(distributed=True) needs torch.distributed initialised first")
        world, rank = dist.get_world_size(), dist.get_rank()
    device = micro_batches[0][0].device
    loss_dtype = model.logit_scale.dtype

    earlier = {}
    if world > 1:  # keep gradients from earlier calls out of the all-reduce
        earlier = {p: p.grad for p in model.parameters() if p.grad is not None}
        for p in earlier:
            p.grad = None

    if len(micro_batches) == 1:
        # One micro-batch: no recomputation needed. Encode with grad; under DDP the local features
        # (with their graph) take this rank's slot among the gathered ones.
        neuro_local, gene_local = _encode(model, micro_batches[0], device, autocast_dtype, loss_dtype)  # (B, P)
        loss = _global_loss(model, neuro_local, gene_local, world, rank)
        loss.backward()
    else:
        loss = _gradient_cache_step(model, micro_batches, device, autocast_dtype, loss_dtype, world, rank)

    if world > 1:
        _all_reduce_gradients(model, world)
        for p, grad in earlier.items():
            p.grad = grad if p.grad is None else p.grad.add_(grad)
    return float(loss.detach())


def _global_loss(model, neuro_local, gene_local, world: int, rank: int) -> torch.Tensor:
    """The loss over all ranks' rows (world*n, P); gradients flow only into this rank's rows."""
    if world == 1:
        return model.contrastive_loss(neuro_local, gene_local)
    return model.contrastive_loss(_gather_rows(neuro_local, world, rank), _gather_rows(gene_local, world, rank))


def _gradient_cache_step(model, micro_batches, device, autocast_dtype, loss_dtype, world, rank) -> torch.Tensor:
    # Pass 1: features of every micro-batch, no graph kept.
    rng_states, neuro_parts, gene_parts = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            rng_states.append(_rng_state(device))
            neuro_features, gene_features = _encode(model, batch, device, autocast_dtype, loss_dtype)
            neuro_parts.append(neuro_features)
            gene_parts.append(gene_features)
    rng_after = _rng_state(device)
    neuro_local = torch.cat(neuro_parts).requires_grad_()  # (K*B, P) leaf
    gene_local = torch.cat(gene_parts).requires_grad_()  # (K*B, P) leaf

    # The loss over the whole (global) batch; its backward fills the feature leaves' .grad and the
    # temperature's / bias's .grad.
    loss = _global_loss(model, neuro_local, gene_local, world, rank)
    loss.backward()

    # Pass 2: recompute each micro-batch with grad, same dropout masks, and push the cached grads in.
    sizes = [len(part) for part in neuro_parts]
    neuro_grads = neuro_local.grad.split(sizes)
    gene_grads = gene_local.grad.split(sizes)
    try:
        for k, batch in enumerate(micro_batches):
            _set_rng_state(device, rng_states[k])
            neuro_features, gene_features = _encode(model, batch, device, autocast_dtype, loss_dtype)
            torch.autograd.backward([neuro_features, gene_features], [neuro_grads[k], gene_grads[k]])
    finally:
        _set_rng_state(device, rng_after)  # as if each micro-batch had been encoded once
    return loss

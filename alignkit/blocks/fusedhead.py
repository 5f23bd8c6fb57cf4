"""An LM head whose backward recomputes nothing: the head's gradients are computed during the forward pass.

A loss on the shared log-prob path (alignkit.blocks.logps) is a sum over groups of rows (a preference pair, a
row) of terms that read the groups' per-row log-prob sums, given fixed side inputs. So the forward can
run chunk by chunk over whole groups:

1. the head's `[chunk, vocab]` logits, once, with autograd on; each position's log p(target);
2. the chunk's per-row sums, its groups' terms, and d(weighted terms)/d(log p) per position (a small graph);
3. `torch.autograd.grad` of the log-probs with those per-position weights, into the chunk's hidden states
   and the head's parameters (the two gradient matmuls);

then the chunk's logits are freed. Only the hidden-state gradient `[positions, H]` and the parameter
gradients (one head-sized accumulator) are kept for the backward, which scales them by its incoming
gradient. A group with more positions than `chunk_size` runs its head twice (a no-grad pass for the
per-position weights, then one sub-chunk at a time with gradient), as the checkpointed path does.

The engine multiplies each summed term by its own factor (one over its unit's count for the whole step,
which it puts in `StepContext.totals` before the loss runs), so the forward weights the terms with those
factors (`weights`, see alignkit.blocks.logps.count_weights); a backward whose incoming gradients are not
proportional to them (a caller that weights the terms otherwise) recomputes with the actual ones: exact,
at the checkpointed path's cost.
"""

import torch

from alignkit.blocks.lmhead import LMHead
from alignkit.plugin.loss import at_least_fp32


def fused_terms(head: LMHead, hidden_BTH, targets_BT, select_BT, label_mask_BT, nll_mask_BT, last_B, vocab: int,
                terms, group_size: int, chunk_size: int, weights: dict[str, float] | None = None):
    """((RowLogps without gradient, {unit: summed term}) of all groups; the terms carry the head's gradient."""
    from alignkit.blocks.logps import RowLogps, group_rows

    rows, positions = select_BT.shape
    n = rows // group_size
    row_N = torch.arange(rows, device=select_BT.device)[:, None].expand(rows, positions)[select_BT]
    hidden_NH = hidden_BTH[select_BT]
    plan = _plan(torch.bincount(row_N % n, minlength=n).tolist(), chunk_size)
    with torch.no_grad():
        unscored = head.vocab_sums(hidden_BTH[~select_BT], chunk_size)  # logits/* read every position
        row_U = torch.arange(rows, device=row_N.device)[:, None].expand(rows, positions)[~select_BT]
        static = dict(targets=targets_BT[select_BT], label=label_mask_BT[select_BT], nll=nll_mask_BT[select_BT],
                      tokens=label_mask_BT.sum(-1), nll_tokens=nll_mask_BT.sum(-1),
                      logits_sum=unscored.new_zeros(rows).index_add(0, row_U, unscored))
    params = [p for p in head.module.parameters() if p.requires_grad]
    keys: list[str] = []

    def run(factors: dict[str, float]):
        """Terms, per-row stats and the gradients of sum_k factors[k] * term_k, chunk by chunk."""
        sums = {k: 0.0 for k in keys}
        logps, nll = (static["tokens"].new_zeros(rows, dtype=torch.float32),
                      static["tokens"].new_zeros(rows, dtype=torch.float32))
        logits_sum = static["logits_sum"].clone()
        d_hidden = torch.zeros_like(hidden_NH)
        d_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for groups in plan:
            groups_t = torch.tensor(groups, device=row_N.device)
            chunk_rows = group_rows(groups_t, n, group_size)
            local = torch.full((rows,), -1, dtype=torch.long, device=row_N.device)
            local[chunk_rows] = torch.arange(len(chunk_rows), device=row_N.device)
            idx = (local[row_N] >= 0).nonzero().squeeze(-1)
            where = local[row_N[idx]]
            subs = idx.split(chunk_size)
            keep_graph = len(subs) == 1
            pieces = [_logps(head, hidden_NH[i], static["targets"][i], grad=keep_graph) for i in subs]
            lp = torch.cat([p[0] for p in pieces])
            label, nll_mask = static["label"][idx], static["nll"][idx]
            # d(weighted terms)/d(log p) per position, on a graph over the chunk's small per-position log-probs
            with torch.enable_grad():
                leaf = lp.detach().requires_grad_()
                m = len(chunk_rows)
                stats = RowLogps(
                    logps=leaf.new_zeros(m).index_add(0, where, leaf * label),
                    tokens=static["tokens"][chunk_rows], nll=leaf.new_zeros(m).index_add(0, where, -leaf * nll_mask),
                    nll_tokens=static["nll_tokens"][chunk_rows], logits_sum=logits_sum[chunk_rows],
                    last_logits_sum=last_B[chunk_rows], positions=positions, vocab=vocab)
                out = terms(stats, groups_t)
                if not keys:
                    keys.extend(out)
                    sums.update({k: 0.0 for k in keys})
                total = sum(factors.get(k, 1.0) * v for k, v in out.items())
                g = torch.autograd.grad(total, leaf)[0] if torch.is_tensor(total) and total.requires_grad \
                    else torch.zeros_like(leaf)
            for k, v in out.items():
                sums[k] = sums[k] + v.detach()
            logps.index_add_(0, chunk_rows, stats.logps.detach())
            nll.index_add_(0, chunk_rows, stats.nll.detach())
            logits_sum.index_add_(0, row_N[idx], torch.cat([p[1] for p in pieces]))
            for i, g_i, piece in zip(subs, g.split(chunk_size), pieces):
                h = piece[2] if keep_graph else None
                lp_i = piece[0] if keep_graph else None
                if not keep_graph:  # a group over chunk_size positions: this sub-chunk again, with gradient
                    lp_i, _, h = _logps(head, hidden_NH[i], static["targets"][i], grad=True)
                with torch.enable_grad():
                    grads = torch.autograd.grad(lp_i, [h, *params], g_i, allow_unused=True)
                d_hidden[i] = grads[0].to(d_hidden.dtype)
                for acc, grad in zip(d_params, grads[1:]):
                    if grad is not None:
                        acc += grad
        values = torch.stack([at_least_fp32(torch.as_tensor(sums[k], device=lp.device))
                              for k in keys]) if keys else None
        stats = RowLogps(logps=logps, tokens=static["tokens"], nll=nll, nll_tokens=static["nll_tokens"],
                         logits_sum=logits_sum, last_logits_sum=last_B, positions=positions, vocab=vocab)
        return values, stats, d_hidden, d_params

    guess = dict(weights or {})
    values, stats, d_hidden, d_params = run(guess)
    out = _FusedHead.apply(run, [guess.get(k, 1.0) for k in keys], keys, values, d_hidden, d_params, hidden_NH, *params)
    return stats, dict(zip(keys, out))


class _FusedHead(torch.autograd.Function):
    """Returns the precomputed terms; the backward hands back the precomputed gradients, scaled."""

    @staticmethod
    def forward(ctx, run, factors, keys, values, d_hidden, d_params, hidden_NH, *params):
        ctx.run, ctx.factors, ctx.keys, ctx.dtypes = run, factors, keys, [p.dtype for p in params]
        ctx.save_for_backward(d_hidden, *d_params)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        d_hidden, *d_params = ctx.saved_tensors
        w = torch.tensor(ctx.factors, dtype=grad_values.dtype, device=grad_values.device)
        scale = (grad_values @ w) / (w @ w)
        if (grad_values - scale * w).abs().max() > 1e-6 * grad_values.abs().max():
            # the engine weighted the terms otherwise than the loss expected: recompute with its weights
            _, _, d_hidden, d_params = ctx.run(dict(zip(ctx.keys, grad_values.tolist())))
            scale = 1.0
        return (None, None, None, None, None, None, d_hidden * scale,
                *[(d * scale).to(dtype) for d, dtype in zip(d_params, ctx.dtypes)])


def _logps(head: LMHead, hidden_NH: torch.Tensor, targets_N: torch.Tensor, grad: bool):
    """log p(target) [N] and the logits' vocab sums [N] (no grad); with grad, the graph from a fresh leaf hidden."""
    h = hidden_NH.detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        logits = at_least_fp32(head.logits(h))
        lp = logits.gather(-1, targets_N[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return lp, logits.detach().sum(-1), h


def _plan(positions_per_group: list[int], chunk_size: int) -> list[list[int]]:
    """Consecutive groups in chunks of at most chunk_size positions (a larger group alone in its chunk)."""
    plan, current, size = [], [], 0
    for g, count in enumerate(positions_per_group):
        if current and size + count > chunk_size:
            plan.append(current)
            current, size = [], 0
        current.append(g)
        size += count
    if current:
        plan.append(current)
    return plan


def _chunk_logits(head: LMHead, hidden_NH: torch.Tensor, targets_N: torch.Tensor, grad: bool, temperature: float = 1.0):
    """(a fresh leaf of the chunk's hidden states, its logits / temperature, log p(target)); with grad, the graph."""
    h = hidden_NH.detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        logits = at_least_fp32(head.logits(h))
        if temperature != 1.0:
            logits = logits / temperature
        lp = logits.gather(-1, targets_N[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return h, logits, lp


def _add_grads(outputs, h, params, positions, d_hidden, d_params, grad_outputs=None) -> None:
    """Accumulate d(outputs)/d(hidden at `positions`) and d(outputs)/d(params) into the running gradients."""
    grads = torch.autograd.grad(outputs, [h, *params], grad_outputs, allow_unused=True)
    d_hidden[positions] = grads[0].to(d_hidden.dtype)
    for acc, g in zip(d_params, grads[1:]):
        if g is not None:
            acc += g


def _gradients(head: LMHead, hidden_NH: torch.Tensor):
    """(trainable head parameters, whether gradients are wanted, zeroed hidden and parameter gradients)."""
    params = [p for p in head.module.parameters() if p.requires_grad]
    grad = torch.is_grad_enabled() and (hidden_NH.requires_grad or bool(params))
    d_hidden = torch.zeros_like(hidden_NH) if grad else None
    return params, grad, d_hidden, [torch.zeros_like(p, dtype=torch.float32) for p in params] if grad else []


def fused_token_terms(head: LMHead, hidden_NH: torch.Tensor, targets_N: torch.Tensor, chunk_size: int, term=None,
                      stats=None, temperature: float = 1.0, distribution: bool = False):
    """A token-level loss on the fused head: (its summed term, log p(target) [N] without gradient, and
    `stats(logits, targets)` of each chunk concatenated, without gradient).

    `term(logps_n, positions)` is the summed term of the chunk's positions (`positions`, a slice of the N), given
    fixed side inputs (e.g. advantages and old log-probs indexed by `positions`); by default the NLL,
    -sum log p(target). Since the term is a sum over positions, its gradients with respect to the chunk's hidden
    states and the head's parameters are computed in the forward, chunk by chunk, and the backward only scales
    them by its incoming gradient: the head's [chunk, vocab] product runs once and its logits are freed at once.
    Logits are divided by `temperature` (a sampler's). With `distribution`, the term is `term(logps_n, positions,
    logprobs_nV)`, the chunk's full-vocabulary log-probs (with gradient) as its third argument (a divergence).
    Without gradient (evaluation) it is a plain chunked pass."""
    term = term or (lambda logps, positions: -logps.sum())
    params, grad, d_hidden, d_params = _gradients(head, hidden_NH)
    total = hidden_NH.new_zeros((), dtype=torch.float32)
    logps, parts = [], []
    for start in range(0, hidden_NH.shape[0], chunk_size):
        positions = slice(start, start + chunk_size)
        h, logits, lp = _chunk_logits(head, hidden_NH[positions], targets_N[positions], grad, temperature)
        with torch.set_grad_enabled(grad):
            value = term(lp, positions, torch.log_softmax(logits, -1)) if distribution else term(lp, positions)
        if grad and value.requires_grad:
            _add_grads(value, h, params, positions, d_hidden, d_params)
        total = total + value.detach()
        logps.append(lp.detach())
        if stats is not None:
            with torch.no_grad():
                parts.append(stats(logits.detach(), targets_N[positions]))
        del logits
    extra = tuple(torch.cat(x) for x in zip(*parts)) if parts else ()
    logps_N = torch.cat(logps) if logps else hidden_NH.new_zeros(0, dtype=torch.float32)
    if grad:
        total = _Precomputed.apply(total, d_hidden, d_params, hidden_NH, *params)
    return total, logps_N, extra


def fused_row_terms(head: LMHead, hidden_NH: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor, n_rows: int,
                    chunk_size: int, term, stats=None, temperature: float = 1.0):
    """A loss on per-row log-prob sums, on the fused head: (its summed term, the rows' log-prob sums [n_rows]
    without gradient, and `stats(logits, targets)` of each chunk concatenated, without gradient).

    The N positions belong to rows `rows_N` (non-decreasing: row-major, as `hidden_BTH[mask_BT]` lays them out).
    `term(row_logps_m, rows_m)` is the summed term of some whole rows, given fixed side inputs indexed by `rows_m`
    (e.g. a reference's log-probs); the sum of row terms, so whole rows run chunk by chunk and the head's
    gradients are computed in the forward. A row over `chunk_size` positions runs its head twice (a pass
    without gradient for the row's sum, then one sub-chunk at a time with gradient), as checkpointing would.
    Logits are divided by `temperature` (a sampler's), also those `stats` receives."""
    params, grad, d_hidden, d_params = _gradients(head, hidden_NH)
    counts = torch.bincount(rows_N, minlength=n_rows).tolist()
    row_logps = hidden_NH.new_zeros(n_rows, dtype=torch.float32)
    total = hidden_NH.new_zeros((), dtype=torch.float32)
    parts, start = [], 0

    def chunk(positions, with_grad, keep_stats=True):
        h, logits, lp = _chunk_logits(head, hidden_NH[positions], targets_N[positions], with_grad, temperature)
        if stats is not None and keep_stats:
            with torch.no_grad():
                parts.append(stats(logits.detach(), targets_N[positions]))
        return h, lp

    for rows in _plan(counts, chunk_size):
        size = sum(counts[r] for r in rows)
        positions, rows_t = slice(start, start + size), torch.tensor(rows, device=rows_N.device)
        if size <= chunk_size or len(rows) > 1:  # whole rows in one pass
            h, lp = chunk(positions, grad)
            with torch.set_grad_enabled(grad):
                sums = lp.new_zeros(len(rows)).index_add(0, rows_N[positions] - rows[0], lp)
                value = term(sums, rows_t)
            if grad and value.requires_grad:
                _add_grads(value, h, params, positions, d_hidden, d_params)
        else:  # one row longer than a chunk: its sum first (its stats taken there), then sub-chunks with d(term)/d(sum)
            subs = [slice(s, min(s + chunk_size, start + size)) for s in range(start, start + size, chunk_size)]
            with torch.no_grad():
                sums = sum(chunk(sub, False)[1].sum() for sub in subs).reshape(1)
            leaf = sums.requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                value = term(leaf, rows_t)
            if grad and value.requires_grad:
                g = torch.autograd.grad(value, leaf)[0]
                for sub in subs:
                    h, lp = chunk(sub, True, keep_stats=False)
                    _add_grads(lp, h, params, sub, d_hidden, d_params, g.expand_as(lp))
        row_logps[rows_t] = sums.detach()
        total = total + value.detach()
        start += size
    extra = tuple(torch.cat(x) for x in zip(*parts)) if parts else ()
    if grad:
        total = _Precomputed.apply(total, d_hidden, d_params, hidden_NH, *params)
    return total, row_logps, extra


class _Precomputed(torch.autograd.Function):
    """Returns a summed term; the backward hands back the gradients computed in the forward, scaled."""

    @staticmethod
    def forward(ctx, total, d_hidden, d_params, hidden_NH, *params):
        ctx.dtypes = [p.dtype for p in params]
        ctx.save_for_backward(d_hidden, *d_params)
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total):
        d_hidden, *d_params = ctx.saved_tensors
        return (None, None, None, d_hidden * grad_total.to(d_hidden.dtype),
                *[(d * grad_total).to(dtype) for d, dtype in zip(d_params, ctx.dtypes)])

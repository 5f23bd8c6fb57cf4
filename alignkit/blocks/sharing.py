"""Prefix sharing: a pair of rows that start with the same tokens runs as one row, the prefix computed once.

A batch of [first; second] rows (e.g. [chosen; rejected], right-padded to width T) becomes one row per
pair: the first row whole (T positions, its padding included), then the second row from the end of the
pair's common prefix P (T - P positions). Position ids restart at P for the second part. A 4D mask lets
the second part see the prefix (first-part keys before P) and its own earlier real tokens, never the rest
of the first row; every query sees only real keys (as the padded batch's mask does). A causal LM's hidden
state at a position depends only on the tokens and positions it attends to, so every position of both
original rows, padding included, gets the hidden state it would get in the padded batch; `unshare`
gathers them back into the [2 * pairs, T, H] layout.

Needs an attention implementation that takes a custom 4D mask (sdpa, eager).

A sequence classifier (e.g. a reward model) reads one position per row: `shared_scores` runs its pairs shared
and applies its score head to the hidden state of each original row's pooled token only.

Groups (`share_groups`): consecutive rows that start with the same tokens (an online method's samples of one
prompt: the prompt left-padded, each completion after it) run as one row per group, the same way: the group's first
row whole, then each other row from the end of the group's common prefix, seeing the prefix and its own tokens.
"""

from dataclasses import dataclass

import torch

from alignkit.blocks.prefix_attention import PREFIX_ATTENTION, full_attention_only

#: attention implementations that take an additive 4D mask as given
SHARING_ATTENTION = ("sdpa", "eager")


@dataclass
class SharedRows:
    input_ids: torch.Tensor  # [pairs, L]
    position_ids: torch.Tensor  # [pairs, L]
    attention_mask: torch.Tensor  # [pairs, 1, L, L] additive (0 where a query may attend, dtype min elsewhere)
    index: torch.Tensor  # [2 * pairs, T]: position of each original (row, t) in the flattened shared rows

    def unshare(self, hidden_PLH: torch.Tensor) -> torch.Tensor:
        """The hidden states [2 * pairs, T, H] of the original rows (differentiable gather)."""
        return hidden_PLH.reshape(-1, hidden_PLH.shape[-1])[self.index]


def common_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per pair [n]: how many leading positions row g and row g + n share (the same ids under the same mask: a
    left-padded prompt's padding counts), up to the end of the shorter row's real tokens."""
    n, width = input_ids.shape[0] // 2, input_ids.shape[1]
    ends = (torch.arange(1, width + 1, device=input_ids.device) * attention_mask.bool()).amax(-1)  # past the last
    same = (input_ids[:n] == input_ids[n:]) & (attention_mask[:n] == attention_mask[n:])
    return same.long().cumprod(-1).sum(-1).clamp(max=torch.minimum(ends[:n], ends[n:]))


def share_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype,
               split: bool = False) -> SharedRows:
    """The shared layout of a right-padded [first; second] batch (see the module docstring). `split`: the mask only
    for the second part's queries, [pairs, 1, L - T, L] (prefix_attention's split layout: the first part causal)."""
    rows, width = input_ids.shape
    n, device = rows // 2, input_ids.device
    prefix = common_prefix(input_ids, attention_mask)  # [n]
    lengths = attention_mask.sum(-1)
    total = 2 * width - int(prefix.min())
    split = split and total > width
    t = torch.arange(total, device=device)
    second = t[None] >= width  # [1, L]: the second part
    # original position of each shared slot: first part t, second part P + (t - T)
    pos = torch.where(second, prefix[:, None] + t[None] - width, t[None].expand(n, total))  # [n, L]
    used = pos < width  # slots past 2T - P hold nothing
    source = torch.where(second, n + torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[:, None])
    ids = torch.where(used, input_ids[source, pos.clamp(max=width - 1)], input_ids[0, 0])
    real = used & attention_mask[source, pos.clamp(max=width - 1)].bool()  # [n, L]: a real token of its row
    # query i may see key j: j real, pos[j] <= pos[i], and j in i's part, or j a prefix slot of the first part
    q = slice(width if split else 0, None)  # the queries the mask covers
    q_second, k_second = second[..., q, None], second[..., None, :]
    same_part = q_second == k_second
    prefix_key = ~k_second & (pos[:, None, :] < prefix[:, None, None])
    allowed = real[:, None, :] & (pos[:, None, :] <= pos[:, q, None]) & (same_part | (q_second & prefix_key))
    itself = t[q, None] == t[None]
    allowed |= itself[None] & ~used[:, q, None]  # empty slots: themselves
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    # back to [2n, T]: first rows read slot t; second rows read t below their prefix, else T + t - P
    tt = torch.arange(width, device=device)[None]
    g = torch.arange(n, device=device)[:, None]
    first_index = g * total + tt
    second_index = g * total + torch.where(tt < prefix[:, None], tt, width + tt - prefix[:, None])
    del lengths
    return SharedRows(ids, pos, mask[:, None], torch.cat([first_index, second_index]))


def _full_attention(config) -> bool:
    return full_attention_only(config.get_text_config() if hasattr(config, "get_text_config") else config)


def takes_4d_mask(config) -> bool:
    """A model `config` whose attention reads a 4D mask as given: an implementation in SHARING_ATTENTION (or
    prefix_attention's) and full attention in every layer (a given 4D mask replaces the sliding windows)."""
    attention = getattr(config, "_attn_implementation", None)
    return (attention in SHARING_ATTENTION or attention == PREFIX_ATTENTION) and _full_attention(config)


def attention_of(config) -> str:
    """`config`'s attention implementation, and `sliding windows` where a layer has one (for messages)."""
    attention = str(getattr(config, "_attn_implementation", None))
    return attention if _full_attention(config) else f"{attention} with sliding windows"


def without_wrappers(model: torch.nn.Module) -> torch.nn.Module:
    """`model` out of its DDP / accelerate wrappers (their `.module`); a PEFT model stays a PEFT model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def sequence_classifier(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers sequence classifier inside `model` (DDP / accelerate / PEFT wrappers) that `shared_scores`
    can serve: a generic one (its `score` head read at each row's rightmost non-pad token, a pad token set) with an
    attention implementation in SHARING_ATTENTION and full attention in every layer; else None."""
    from transformers.modeling_layers import GenericForSequenceClassification

    inner = without_wrappers(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not isinstance(inner, GenericForSequenceClassification):
        return None
    config = inner.config.get_text_config()
    return inner if config.pad_token_id is not None and takes_4d_mask(inner.config) else None


def shared_scores(model: torch.nn.Module, classifier: torch.nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """The pooled logits [2 * pairs, labels] of a right-padded [first; second] batch, as `model` gives them for
    the padded batch, with each pair's common prefix run once (`classifier`: sequence_classifier(model)).

    The forward goes through `model` (its wrappers' hooks run); the row's pooled token is chosen by the
    classifier's own rule (the rightmost token that is not the pad id) on the original rows."""
    pad = classifier.config.get_text_config().pad_token_id
    width = input_ids.shape[1]
    last = (torch.arange(width, device=input_ids.device) * (input_ids != pad)).argmax(-1)  # [2n]
    dtype = next(classifier.parameters()).dtype
    n = input_ids.shape[0] // 2
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    # the split attention (the first rows causal) where it serves: a first row right-padded (its real tokens see only
    # the real tokens before them) and every pooled token a real one
    split = (classifier.config._attn_implementation == PREFIX_ATTENTION
             and bool((attention_mask[:n].cumprod(-1) == attention_mask[:n]).all())
             and bool(attention_mask[rows, last].bool().all()))
    shared = share_rows(input_ids, attention_mask, dtype if dtype.is_floating_point else torch.float32, split=split)
    outputs = model(input_ids=shared.input_ids, attention_mask=shared.attention_mask,
                    position_ids=shared.position_ids, output_hidden_states=True, use_cache=False)
    hidden_PLH = outputs.hidden_states[-1]
    pooled = hidden_PLH.reshape(-1, hidden_PLH.shape[-1])[shared.index[rows, last]]  # [2n, H]
    return classifier.score(pooled)


@dataclass
class SharedGroups:
    input_ids: torch.Tensor  # [groups, L]
    position_ids: torch.Tensor  # [groups, L]
    attention_mask: torch.Tensor  # [groups, 1, L, L] additive
    index: torch.Tensor  # [rows, T]: position of each original (row, t) in the flattened shared rows

    def unshare(self, hidden_GLH: torch.Tensor) -> torch.Tensor:
        """The hidden states [rows, T, H] of the original rows (differentiable gather)."""
        return hidden_GLH.reshape(-1, hidden_GLH.shape[-1])[self.index]


def prefix_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, min_prefix: int) -> list[tuple[int, int, int]]:
    """(first row, rows, common prefix) of each run of consecutive rows that share at least `min_prefix` leading
    positions (the same ids under the same mask, padding included) with the run's first row."""
    def common(a: int, b: int) -> int:
        same = (input_ids[a] == input_ids[b]) & (attention_mask[a] == attention_mask[b])
        return int(same.long().cumprod(-1).sum())

    groups, start, prefix = [], 0, input_ids.shape[1]
    for row in range(1, input_ids.shape[0] + 1):
        p = common(start, row) if row < input_ids.shape[0] else -1
        if p < min_prefix:
            groups.append((start, row - start, prefix if row - start > 1 else input_ids.shape[1]))
            start, prefix = row, input_ids.shape[1]
        else:
            prefix = min(prefix, p)
    return groups


def share_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: list[tuple[int, int, int]],
                 dtype: torch.dtype) -> SharedGroups:
    """The shared layout of `groups` (prefix_groups) of a [rows, T] batch (see the module docstring)."""
    rows, width = input_ids.shape
    device = input_ids.device
    lengths = [width + (n - 1) * (width - p) for _, n, p in groups]
    total = max(lengths)
    src_row = torch.zeros(len(groups), total, dtype=torch.long)
    pos = torch.zeros(len(groups), total, dtype=torch.long)
    part = torch.full((len(groups), total), -1, dtype=torch.long)  # -1: an empty slot
    prefix = torch.tensor([p for _, _, p in groups])
    index = torch.zeros(rows, width, dtype=torch.long)
    t = torch.arange(width)
    for g, (first, n, p) in enumerate(groups):
        src_row[g, :width], pos[g, :width], part[g, :width] = first, t, 0
        index[first] = g * total + t
        for m in range(1, n):
            start = width + (m - 1) * (width - p)
            src_row[g, start:start + width - p], pos[g, start:start + width - p] = first + m, t[p:]
            part[g, start:start + width - p] = m
            index[first + m] = g * total + torch.where(t < p, t, start + t - p)
    src_row, pos, part, prefix, index = (x.to(device) for x in (src_row, pos, part, prefix, index))
    used = part >= 0
    ids = torch.where(used, input_ids[src_row, pos], input_ids[0, 0])
    real = used & attention_mask[src_row, pos].bool()
    # query i may see key j: j real, pos[j] <= pos[i], and j in i's part, or j a prefix slot of the first row
    q_part, k_part = part[:, :, None], part[:, None, :]
    prefix_key = (k_part == 0) & (pos[:, None, :] < prefix[:, None, None])
    allowed = real[:, None, :] & (pos[:, None, :] <= pos[:, :, None]) & ((q_part == k_part) | prefix_key)
    lonely = ~allowed.any(-1)  # a padding query with no real key before it (or an empty slot): itself
    allowed |= torch.eye(total, dtype=torch.bool, device=device)[None] & lonely[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return SharedGroups(ids, pos, mask[:, None], index)

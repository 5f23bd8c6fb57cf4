"""Per-row log-probabilities of a causal LM's labelled tokens, without its [rows, T, vocab] logits.

`SequenceScorer` is the shared log-prob path of the losses that score whole rows (preference pairs,
completions, rollouts). For each row of a batch it gives the summed log-probs and the count of the
labelled tokens, the NLL sum and count over a second target set (e.g. a chosen row's every token), the
vocab-summed logits (for `logits/*` metrics) and the model's auxiliary loss. The LM head runs only at
the positions a term reads, in chunks (alignkit.blocks.lmhead); models whose head cannot be split off (an
encoder-decoder, a forward without `logits_to_keep`) take the plain path over full logits, with the same
numbers.

Given `terms` (a function from the stats of some groups of rows to summed loss terms, see
`SequenceScorer.__call__`), the chunked path returns those terms and computes the head's gradients
during the forward pass (alignkit.blocks.fusedhead): the head's [chunk, vocab] product runs once.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from alignkit.blocks.fusedhead import fused_terms, fused_token_terms
from alignkit.blocks.lmhead import PACKING_ATTENTION, LMHead, final_hidden_states, require_head, selected_token_logps
from alignkit.blocks.sharing import (
    SHARING_ATTENTION,
    attention_of,
    common_prefix,
    prefix_groups,
    share_groups,
    share_rows,
    takes_4d_mask,
    without_wrappers,
)
from alignkit.errors import ConfigError
from alignkit.formatters.vision import vision_inputs
from alignkit.plugin.loss import at_least_fp32
from alignkit.plugin.method import MethodConfig

log = logging.getLogger(__name__)

#: terms(stats of the rows of some groups, the groups' indices [m]) -> {unit: summed term}
Terms = Callable[["RowLogps", torch.Tensor], dict[str, torch.Tensor]]


class LogpsOptions(MethodConfig):
    """Method config fields of the shared log-prob path (a method config may inherit them)."""

    loss_implementation: str = Field(
        "chunked", pattern="^(chunked|plain)$",
        description="chunked: the LM head runs only at scored positions, in chunks, never holding all logits "
        "(less memory, same numbers); plain: the model's full logits, as TRL (for debugging).")
    logits_chunk_size: int = Field(1024, gt=0, description="Token positions per LM-head chunk of the chunked path.")
    share_prompt: bool | None = Field(
        None, description="Run each pair as one row, [prompt, chosen, rejected], the common prefix computed once "
        "(chunked path, sdpa or eager attention). null: on where the model supports it.")


@dataclass
class RowLogps:
    """Per row [R] of a batch (float32 at least). `logps`, `nll` carry gradient; the logits sums do not."""

    logps: torch.Tensor  # sum of log p(label) over the labelled tokens (label != label_pad_token_id)
    tokens: torch.Tensor  # how many labelled tokens
    nll: torch.Tensor  # sum of -log p(target) over the NLL targets (0 without them)
    nll_tokens: torch.Tensor  # how many NLL targets
    logits_sum: torch.Tensor  # sum of the logits over the vocabulary at positions 0 .. T-2 (those that predict)
    last_logits_sum: torch.Tensor  # the same at the last position T-1
    positions: int  # T - 1
    vocab: int  # the logits' width

    def rows(self, index: torch.Tensor) -> "RowLogps":
        """The stats of the rows `index`, in that order."""
        return self._map(lambda t: t[index])

    def _map(self, fn) -> "RowLogps":
        return RowLogps(**{f.name: fn(getattr(self, f.name)) for f in fields(self)
                           if f.name not in ("positions", "vocab")},
                        positions=self.positions, vocab=self.vocab)

    def detach(self) -> "RowLogps":
        return self._map(torch.Tensor.detach)

    def logits_mean(self, include_last: bool = False) -> torch.Tensor:
        """Mean logit over these rows, their positions 0 .. T-2 (and T-1 with include_last) and the vocabulary."""
        total = self.logits_sum.sum() + (self.last_logits_sum.sum() if include_last else 0)
        return total / (len(self.logits_sum) * (self.positions + include_last) * self.vocab)


def count_weights(counts: dict[str, float], ctx=None) -> dict[str, float]:
    """The engine's factor for each summed term, up to a common scale: one over its unit's total for the step
    (`ctx.totals`, set by the engine in training), else over this batch's `counts`."""
    counts = getattr(ctx, "totals", None) or counts
    return {unit: 1.0 / max(c, 1) for unit, c in counts.items()}  # a unit counting 0 has a 0 term (TRL's clamp)


def group_rows(groups: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """Row indices of `groups` when a batch holds `group_size` blocks of `n` rows (row g + j*n is member j of
    group g): block by block, so the result is laid out as the batch is."""
    return torch.cat([groups + j * n for j in range(group_size)])


class SequenceScorer:
    """Per-row stats of a batch through the chunked LM head (or full logits where the head cannot be split off).

    label_pad_token_id: label value that takes no loss. implementation: "chunked" or "plain".
    padding_free: the real tokens of all rows run as one packed row (needs the chunked path and an
    attention implementation that separates packed sequences by position ids).
    """

    def __init__(self, label_pad_token_id: int = -100, chunk_size: int = 1024, implementation: str = "chunked",
                 padding_free: bool = False, fused: bool = True, share_prompt: bool | None = None) -> None:
        self.ignore, self.chunk_size, self.implementation = label_pad_token_id, chunk_size, implementation
        self.padding_free, self.fused, self.share_prompt = padding_free, fused, share_prompt
        self.head: LMHead | None = None
        self._heads: dict[int, LMHead | None] = {}
        self._checked: set[int] = set()
        self._told_images = False  # the one-time notice that rows with images run unshared

    @classmethod
    def from_config(cls, config) -> "SequenceScorer":
        return cls(getattr(config, "label_pad_token_id", -100), getattr(config, "logits_chunk_size", 1024),
                   getattr(config, "loss_implementation", "chunked"), getattr(config, "padding_free", False),
                   share_prompt=getattr(config, "share_prompt", None))

    def prepare(self, model: torch.nn.Module) -> None:
        """Split the head off the (unwrapped) policy; warn and use the plain path where it cannot be."""
        if self.implementation == "chunked":
            self.head, why = LMHead.of(model)
            if self.head is None:
                log.warning("method.loss_implementation=chunked is not available for %s; using the plain path", why)
            self._heads[id(model)] = self.head
        config = getattr(model, "config", None)
        attention = getattr(config, "_attn_implementation", None)
        takes_mask = config is not None and takes_4d_mask(config)
        if self.share_prompt:
            if self.head is None or self.padding_free or not takes_mask:
                raise ConfigError(
                    f"method.share_prompt needs the chunked loss path, no padding_free and an attention implementation "
                    f"in {', '.join(SHARING_ATTENTION)} with full attention in every layer (this model: "
                    f"{attention_of(config) if config is not None else None}); set method.share_prompt=false")
        elif self.share_prompt is None:
            self.share_prompt = self.head is not None and not self.padding_free and takes_mask
        if self.padding_free:
            if self.head is None or attention not in PACKING_ATTENTION:
                raise ConfigError(
                    f"method.padding_free needs the chunked loss path and an attention implementation in "
                    f"{', '.join(PACKING_ATTENTION)} (this model: {attention}, chunked: {self.head is not None}); "
                    f"set method.padding_free=false")

    def head_of(self, model: torch.nn.Module) -> LMHead | None:
        """The head of `model`: the policy's, or (for another model, e.g. a reference) its own, found once."""
        if self.implementation != "chunked" or self.head is None:
            return None
        inner = without_wrappers(model)
        if id(model) not in self._heads and id(inner) not in self._heads:
            self._heads[id(inner)] = LMHead.of(inner)[0]
        return self._heads.get(id(model), self._heads.get(id(inner)))

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], nll_targets: torch.Tensor | None = None,
                 aux_loss: bool = False, terms: Terms | None = None, group_size: int = 1,
                 weights: dict[str, float] | None = None):
        """(RowLogps [R], aux loss or None, terms or None) of one forward over the batch.

        nll_targets [R, T] (label_pad_token_id where none; rows without NLL all pad): targets of the NLL sums,
        read like labels (the token at t is predicted at t-1). terms: with it, the summed loss terms over all
        groups are returned, where the batch holds `group_size` blocks of R / group_size rows and group g is
        rows g, g + R/group_size, ... (e.g. [chosen; rejected] pairs: group_size 2). terms(stats, groups) must
        add up over groups (a sum over them of per-group values, given fixed side inputs), as the engine's
        summed terms do; the RowLogps returned then carry no gradient. weights: the factor the engine will
        multiply each term by, up to a common scale (one over its unit's count; default 1): the fused head
        computes the gradient of the terms so weighted during the forward (other factors cost a recompute).
        """
        head = self.head_of(model)
        extra = {"output_router_logits": True} if aux_loss else {}
        if head is None:
            stats, outputs = self._plain(model, batch, nll_targets, extra)
        else:
            stats, outputs = self._chunked(model, head, batch, nll_targets, extra,
                                           terms if self.fused else None, group_size, weights)
            if isinstance(stats, tuple):  # the fused head: (detached stats, terms)
                stats, summed = stats
                return stats, outputs.aux_loss if aux_loss else None, summed
        summed = None
        if terms is not None:
            n = batch["input_ids"].shape[0] // group_size
            summed = terms(stats, torch.arange(n, device=stats.logps.device))
        return stats, outputs.aux_loss if aux_loss else None, summed

    def _chunked(self, model, head, batch, nll_targets, extra, terms, group_size, weights):
        outputs, hidden_BTH = self._hidden(model, batch, extra, group_size)
        require_head(head, outputs, self._checked)
        labels_BT = batch["labels"][:, 1:]
        label_mask_BT = labels_BT != self.ignore
        nll_BT = labels_BT if nll_targets is None else nll_targets[:, 1:]
        nll_mask_BT = (nll_BT != self.ignore) if nll_targets is not None else torch.zeros_like(label_mask_BT)
        select_BT = label_mask_BT | nll_mask_BT
        targets_BT = torch.where(label_mask_BT, labels_BT, nll_BT).clamp(min=0)
        last = head.vocab_sums(hidden_BTH[:, -1], self.chunk_size)
        if terms is not None and torch.is_grad_enabled() and hidden_BTH.requires_grad:
            return fused_terms(head, hidden_BTH[:, :-1], targets_BT, select_BT, label_mask_BT, nll_mask_BT, last,
                               outputs.logits.shape[-1], terms, group_size, self.chunk_size, weights), outputs
        logps_BT, sums_BT = selected_token_logps(head, hidden_BTH[:, :-1], targets_BT, select_BT, self.chunk_size)
        return reduce_rows(logps_BT, label_mask_BT, nll_mask_BT, sums_BT, last, outputs.logits.shape[-1]), outputs

    def _hidden(self, model, batch, extra, group_size):
        """(outputs, final hidden states [R, T, H]): pairs sharing their common prefix where that is on."""
        ids, mask, images = batch["input_ids"], batch["attention_mask"], vision_inputs(batch)
        if self.share_prompt and group_size == 2 and images and not self._told_images:
            log.warning("method.share_prompt: rows with images run unshared (each row reads its own images)")
            self._told_images = True
        if (self.share_prompt and group_size == 2 and not extra and not images
                and int(common_prefix(ids, mask).min()) > 0):
            dtype = next(model.parameters()).dtype
            shared = share_rows(ids, mask, dtype if dtype.is_floating_point else torch.float32)
            outputs = model(input_ids=shared.input_ids, attention_mask=shared.attention_mask,
                            position_ids=shared.position_ids, output_hidden_states=True, logits_to_keep=1,
                            use_cache=False)
            return outputs, shared.unshare(outputs.hidden_states[-1])
        return final_hidden_states(model, ids, mask, padding_free=self.padding_free, **extra, **images)

    def _plain(self, model, batch, nll_targets, extra):
        """Full logits (the model's own head): [R, T, V] exist at once."""
        seq2seq = "decoder_input_ids" in batch
        if seq2seq:
            extra["decoder_input_ids"] = batch["decoder_input_ids"]
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                        **vision_inputs(batch), **extra)
        logits_BTV = outputs.logits
        scored = logits_BTV if seq2seq else logits_BTV[:, :-1]
        logps_BTV = torch.log_softmax(at_least_fp32(scored), -1)
        shift = 0 if seq2seq else 1

        def gather(targets_BT):
            targets_BT = targets_BT[:, shift:]
            mask = targets_BT != self.ignore
            return logps_BTV.gather(-1, targets_BT.masked_fill(~mask, 0)[..., None]).squeeze(-1) * mask, mask

        logps_BT, label_mask_BT = gather(batch["labels"])
        nll_logps_BT, nll_mask_BT = (gather(nll_targets) if nll_targets is not None
                                     else (logps_BT, label_mask_BT & False))
        with torch.no_grad():
            sums_BT = at_least_fp32(scored).sum(-1)
            last = at_least_fp32(logits_BTV[:, -1]).sum(-1) if not seq2seq else sums_BT.new_zeros(len(sums_BT))
        stats = reduce_rows(logps_BT, label_mask_BT, nll_mask_BT, sums_BT, last, logits_BTV.shape[-1], nll_logps_BT)
        return stats, outputs


def reduce_rows(logps_BT, label_mask_BT, nll_mask_BT, sums_BT, last_B, vocab, nll_logps_BT=None) -> RowLogps:
    """Per-row sums of token log-probs [R, T'] (0 where not scored) over the label and NLL masks."""
    nll_logps_BT = logps_BT if nll_logps_BT is None else nll_logps_BT
    return RowLogps(logps=(logps_BT * label_mask_BT).sum(-1), tokens=label_mask_BT.sum(-1),
                    nll=-(nll_logps_BT * nll_mask_BT).sum(-1), nll_tokens=nll_mask_BT.sum(-1),
                    logits_sum=sums_BT.sum(-1), last_logits_sum=last_B, positions=sums_BT.shape[1], vocab=vocab)


@dataclass
class TokenScores:
    """Per scored position of a batch (the N positions `select_BT` marks, row-major): log p(label) [N] at the
    scorer's temperature (differentiable unless a `term` was given; then `total` carries the gradient), the entropy
    of each position's distribution [N] (no grad), `stats` of each chunk concatenated, and the summed `term`."""

    logps: torch.Tensor
    entropy: torch.Tensor
    select: torch.Tensor  # [B, T-1]: position t predicts labels[:, t + 1]
    extra: tuple = ()
    total: torch.Tensor | None = None

    def per_token(self, values_N: torch.Tensor | None = None) -> torch.Tensor:
        """values [N] (default: the log-probs) laid out as [B, T-1], 0 where not scored."""
        values_N = self.logps if values_N is None else values_N
        return values_N.new_zeros(self.select.shape).masked_scatter(self.select, values_N)

    def per_row(self, values_N: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row sums [B] of values [N] (default: the log-probs)."""
        return self.per_token(values_N).sum(-1)


class TokenScorer:
    """Per-token values of a causal LM at its labelled positions: log p(label) and entropy at a temperature
    (logits / temperature, as a sampler saw them), without [B, T, vocab] logits on the chunked path.

    `__call__(model, inputs, labels)` runs `model(**inputs)` once; labels [B, T] are read as a causal LM's (the
    token at t is predicted at t-1; label_pad_token_id where nothing is scored). Optional, per chunk of positions:
    `stats(logits_nV, labels_n)`, values without gradient (e.g. accuracy), and `term(logps_n, positions)`, a summed
    loss term given fixed side inputs indexed by `positions` (a slice of the N), or with `distribution=True`
    `term(logps_n, positions, logprobs_nV)` that also reads the chunk's full-vocabulary log-probs (a divergence
    such as a distillation's JSD). In training a term runs on the fused head (alignkit.blocks.fusedhead: its
    gradients are computed in the forward, each chunk's logits freed at once); a model whose head cannot be split
    off takes its full logits (the plain path), with the same numbers.
    """

    def __init__(self, chunk_size: int = 1024, implementation: str = "chunked", temperature: float = 1.0,
                 label_pad_token_id: int = -100, share_prefix: bool = False) -> None:
        if temperature <= 0:
            raise ConfigError(f"the scorer's temperature must be positive, got {temperature}")
        self.chunk_size, self.implementation, self.temperature = chunk_size, implementation, temperature
        self.share_prefix = share_prefix  # consecutive rows with a common prefix run it once (alignkit.blocks.sharing)
        self.ignore = label_pad_token_id
        self._heads: dict[int, LMHead | None] = {}
        self._checked: set[int] = set()

    @classmethod
    def from_config(cls, config, temperature: float = 1.0, share_prefix: bool = False) -> "TokenScorer":
        return cls(getattr(config, "logits_chunk_size", 1024), getattr(config, "loss_implementation", "chunked"),
                   temperature, getattr(config, "label_pad_token_id", -100), share_prefix)

    def head_of(self, model: torch.nn.Module) -> LMHead | None:
        """The split-off head of `model` (found once per model; a warning where it cannot be), or None (plain)."""
        inner = without_wrappers(model)
        if id(inner) not in self._heads:
            head, why = LMHead.of(inner) if self.implementation == "chunked" else (None, "")
            if why:
                log.warning("method.loss_implementation=chunked is not available for %s; using the plain path", why)
            self._heads[id(inner)] = head
        return self._heads[id(inner)]

    prepare = head_of  # Loss.prepare_model: split the policy's head off once

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, term=None,
                 stats=None, distribution: bool = False) -> TokenScores:
        labels_BT = labels[:, 1:]
        select_BT = labels_BT != self.ignore
        targets_N = labels_BT[select_BT]
        head, T = self.head_of(model), labels.shape[1]
        if head is None:  # (the last T positions: a PEFT prompt-learning model puts its virtual tokens first)
            return self._plain(model(**inputs, use_cache=False).logits[:, -T:-1], select_BT, targets_N, term, stats,
                               distribution)
        outputs, hidden_BTH = self.hidden_states(model, inputs)
        require_head(head, outputs, self._checked)
        hidden_NH = hidden_BTH[:, -T:-1][select_BT]
        entropy_stats = _with_entropy(stats)
        if term is not None or not (torch.is_grad_enabled() and hidden_NH.requires_grad):
            total, logps_N, extra = fused_token_terms(head, hidden_NH, targets_N, head.chunk_positions(self.chunk_size),
                                                      term, entropy_stats, self.temperature, distribution)
            entropy_N = extra[0] if extra else logps_N.new_zeros(0)
            return TokenScores(logps_N, entropy_N, select_BT, extra[1:], total if term is not None else None)
        if stats is not None:
            raise ValueError("TokenScorer: stats are computed without gradient; run the scorer under torch.no_grad() "
                             "or give a term")
        chunk = head.chunk_positions(self.chunk_size)
        parts = [checkpoint(_scored_chunk, head, h, t, self.temperature, use_reentrant=False)
                 for h, t in zip(hidden_NH.split(chunk), targets_N.split(chunk))]
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        logps_N, entropy_N = (torch.cat(x) for x in zip(*parts)) if parts else (empty + hidden_NH.sum() * 0, empty)
        return TokenScores(logps_N, entropy_N.detach(), select_BT)

    def hidden_states(self, model, inputs):
        """(outputs, final hidden states [B, T, H]) of `model(**inputs)` scoring one position (a loss that runs its
        own head on them, e.g. per-row terms); with share_prefix, runs of consecutive rows that share at least
        a quarter of their width as a prefix (a prompt's samples) run it once, where that saves a fifth of the
        positions and the [groups, L, L] mask stays under 64M entries."""
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if self.share_prefix and set(inputs) == {"input_ids", "attention_mask"} and _takes_4d_mask(model):
            rows, width = ids.shape
            groups = prefix_groups(ids, mask, max(1, width // 4))
            total = max(width + (n - 1) * (width - p) for _, n, p in groups)
            if len(groups) * total <= 0.8 * rows * width and len(groups) * total ** 2 <= 2 ** 26:
                dtype = next(model.parameters()).dtype
                shared = share_groups(ids, mask, groups, dtype if dtype.is_floating_point else torch.float32)
                outputs = model(input_ids=shared.input_ids, attention_mask=shared.attention_mask,
                                position_ids=shared.position_ids, output_hidden_states=True, logits_to_keep=1,
                                use_cache=False)
                return outputs, shared.unshare(outputs.hidden_states[-1])
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        return outputs, outputs.hidden_states[-1]

    def _plain(self, logits_BTV, select_BT, targets_N, term, stats, distribution) -> TokenScores:
        logits_NV = at_least_fp32(logits_BTV[select_BT])
        if self.temperature != 1.0:
            logits_NV = logits_NV / self.temperature
        log_z_N = torch.logsumexp(logits_NV, -1)
        logps_N = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - log_z_N
        with torch.no_grad():
            entropy_N = log_z_N - (torch.softmax(logits_NV, -1) * logits_NV).sum(-1)
            extra = stats(logits_NV, targets_N) if stats is not None else ()
        total = None
        if term is not None:
            args = (logps_N, slice(0, len(logps_N))) + ((logits_NV - log_z_N[:, None],) if distribution else ())
            total = term(*args)
        return TokenScores(logps_N, entropy_N, select_BT, tuple(extra), total)


def _takes_4d_mask(model: torch.nn.Module) -> bool:
    """A causal LM whose attention reads a custom 4D mask (SHARING_ATTENTION), with no tokens of its own put before
    the inputs (a PEFT prompt-learning model's virtual tokens)."""
    inner = without_wrappers(model)
    peft_config = getattr(inner, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    config = getattr(inner, "config", None)
    return config is not None and takes_4d_mask(config) and not getattr(config, "is_encoder_decoder", False)


def entropy_of(logits_NV: torch.Tensor) -> torch.Tensor:
    """The entropy of softmax(logits) at each position [N], without gradient."""
    with torch.no_grad():
        return torch.logsumexp(logits_NV, -1) - (torch.softmax(logits_NV, -1) * logits_NV).sum(-1)


def _with_entropy(stats):
    return lambda logits, targets: (entropy_of(logits), *(stats(logits, targets) if stats is not None else ()))


def _scored_chunk(head: LMHead, hidden_nH: torch.Tensor, targets_n: torch.Tensor, temperature: float):
    logits = at_least_fp32(head.logits(hidden_nH))
    if temperature != 1.0:
        logits = logits / temperature
    logps = logits.gather(-1, targets_n[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return logps, entropy_of(logits)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's pairwise-preference metrics (no gradient): rewards/chosen, /rejected, /accuracies, /margins and
    logps/chosen, /rejected, each the mean over the batch's pairs."""
    with torch.no_grad():
        return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_logps.dtype).mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}

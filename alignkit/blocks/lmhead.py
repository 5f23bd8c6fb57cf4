"""Token log-probs from a causal LM without materialising its [rows, T, vocab] logits.

The model runs through its own forward (so DDP, FSDP and PEFT wrappers see an ordinary call) with
`output_hidden_states=True` and `logits_to_keep=1`: its head scores one position, and the final,
normalised hidden states come back. The LM head then runs only at the positions a loss asks for, in
chunks, each under activation checkpointing: the backward recomputes a chunk's logits, so at most one
chunk of logits exists at a time. One log-sum-exp per position serves every term that reads it.
alignkit.blocks.logps builds per-row stats on these functions, and alignkit.blocks.fusedhead a variant whose backward
recomputes nothing (the gradients are computed in the forward).
"""

import inspect
import logging
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignkit.errors import ConfigError
from alignkit.plugin.loss import at_least_fp32

log = logging.getLogger(__name__)

#: attention implementations whose masks transformers builds per packed sequence from position ids
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
#: the most logits (float32 entries) one chunk of the token scorer's head may hold: a chunk's logits, their softmax
#: and their gradient live at once, so the head's transient memory is about 3 x 64 MB whatever the vocabulary
CHUNK_LOGITS = 2 ** 24


@dataclass
class LMHead:
    """The model's output embedding plus the logit transforms its forward applies after it."""

    module: torch.nn.Module
    scale: float | None = None  # Cohere-style logit_scale
    softcap: float | None = None  # Gemma-2-style final_logit_softcapping

    @classmethod
    def of(cls, model: torch.nn.Module) -> "tuple[LMHead | None, str]":
        """The head of an unwrapped (or PEFT-wrapped) causal LM, or None and the reason it cannot be split off."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return None, "an encoder-decoder model"
        get_head = getattr(base, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if head is None:
            return None, f"{type(base).__name__} has no output embedding"
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return None, f"{type(base).__name__}.forward takes no logits_to_keep"
        return cls(head, getattr(config, "logit_scale", None), getattr(config, "final_logit_softcapping", None)), ""

    @property
    def vocab_size(self) -> int:
        out = getattr(self.module, "out_features", None)
        return int(out) if out is not None else int(self.module.weight.shape[0])

    def chunk_positions(self, chunk_size: int) -> int:
        """Positions per chunk: `chunk_size`, or fewer where the vocabulary is large, so that a chunk's float32
        logits stay within CHUNK_LOGITS entries (64 MB: 524 positions at 32,000 tokens, 110 at Qwen's 151,936;
        never below 64)."""
        return min(chunk_size, max(64, CHUNK_LOGITS // self.vocab_size))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.module(hidden)
        if self.scale is not None:
            out = out * self.scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def vocab_sums(self, hidden_NH: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Sum over the vocabulary of each position's logits [N] (float32), without gradient.

        A plain linear head is linear in the hidden state: the sum is h . sum_v W_v (+ sum_v b_v), no
        [N, V] product needed. Any other head is run in chunks.
        """
        with torch.no_grad():
            if type(self.module) is torch.nn.Linear and self.softcap is None:
                with torch.autocast(hidden_NH.device.type, enabled=False):
                    out = at_least_fp32(hidden_NH) @ at_least_fp32(self.module.weight).sum(0)
                    if self.module.bias is not None:
                        out = out + at_least_fp32(self.module.bias).sum()
                return out * self.scale if self.scale is not None else out
            sums = [at_least_fp32(self.logits(h)).sum(-1) for h in hidden_NH.split(chunk_size)]
            return torch.cat(sums) if sums else hidden_NH.new_zeros(0, dtype=torch.float32)


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        padding_free: bool = False, **kwargs):
    """(model outputs, final hidden states [B, T, H]) of one forward that scores a single position.

    padding_free: the real tokens of all rows run as one packed row with per-sequence position ids (no
    padding reaches the model); the hidden states come back in the padded layout, zero at padding.
    """
    if not padding_free:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    logits_to_keep=1, use_cache=False, **kwargs)
        return out, out.hidden_states[-1]
    keep = attention_mask.bool()
    position_ids = (attention_mask.long().cumsum(-1) - 1)[keep][None]
    out = model(input_ids=input_ids[keep][None], position_ids=position_ids, output_hidden_states=True,
                logits_to_keep=1, use_cache=False, **kwargs)
    packed = out.hidden_states[-1][0]
    hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1]).masked_scatter(keep[..., None], packed)
    return out, hidden


def _chunk_logps(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = at_least_fp32(head.logits(hidden))
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return logps, logits.detach().sum(-1)


def token_logps(head: LMHead, hidden_NH: torch.Tensor, targets_N: torch.Tensor,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at each position [N] (float32, differentiable) and its logits' vocab sum [N] (no grad)."""
    logps, sums = [], []
    for h, t in zip(hidden_NH.split(chunk_size), targets_N.split(chunk_size)):
        if torch.is_grad_enabled() and h.requires_grad:
            lp, s = checkpoint(_chunk_logps, head, h, t, use_reentrant=False)
        else:
            lp, s = _chunk_logps(head, h, t)
        logps.append(lp)
        sums.append(s)
    if not logps:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(sums)


def selected_token_logps(head: LMHead, hidden_BTH: torch.Tensor, targets_BT: torch.Tensor, select_BT: torch.Tensor,
                         chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [B, T] at the selected positions (0 elsewhere), and every position's logits vocab sum [B, T].

    The head runs (with gradient) only where `select_BT` is true; the vocab sums elsewhere come from
    `LMHead.vocab_sums`.
    """
    logps_N, sums_N = token_logps(head, hidden_BTH[select_BT], targets_BT[select_BT], chunk_size)
    logps_BT = sums_N.new_zeros(select_BT.shape).masked_scatter(select_BT, logps_N)
    sums_BT = sums_N.new_zeros(select_BT.shape)
    sums_BT[select_BT] = sums_N
    sums_BT[~select_BT] = head.vocab_sums(hidden_BTH[~select_BT], chunk_size)
    return logps_BT, sums_BT


def check_head(head: LMHead, outputs) -> bool:
    """Whether the split-off head reproduces the model's own logits at the one position it scored."""
    with torch.no_grad():
        ours = head.logits(outputs.hidden_states[-1][:, -1])
        theirs = outputs.logits[:, -1]
        return ours.shape == theirs.shape and torch.allclose(ours.float(), theirs.float(), rtol=1e-3, atol=1e-3)


def require_head(head: LMHead, outputs, checked: set[int]) -> None:
    """Once per head (`checked` holds the ids of heads already seen to match): refuse, as a ConfigError naming
    method.loss_implementation, a split-off head that does not reproduce the model's own logits (`check_head`)."""
    if id(head) in checked:
        return
    if not check_head(head, outputs):
        raise ConfigError("method.loss_implementation=chunked: the model's output embedding does not reproduce "
                          "its logits (a logit transform alignkit does not know?); set "
                          "method.loss_implementation=plain")
    checked.add(id(head))

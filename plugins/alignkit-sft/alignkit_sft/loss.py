"""The SFT objective: token-level negative log-likelihood of the labelled tokens, normalised by their
count over the whole optimizer step (unit "tokens"), with exact per-token metrics.

Accuracy and entropy read the whole next-token distribution, so they are computed where the log-prob
is, chunk by chunk at the trained positions only: no [rows, T, vocab] logits on the chunked path, whose
head gradients are computed in the forward (alignkit.blocks.fusedhead.fused_token_terms; no recompute).
"""

import logging

import torch

from alignkit import ConfigError, Loss, LossOutput
from alignkit.blocks.fusedhead import fused_token_terms
from alignkit.blocks.lmhead import LMHead, check_head
from alignkit.plugin.loss import at_least_fp32

log = logging.getLogger(__name__)


def token_stats(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position: log p(target) (differentiable), the entropy of the distribution and whether the target is
    its argmax (both without gradient). At least float32."""
    logits_NV = at_least_fp32(logits_NV)
    log_z_N = torch.logsumexp(logits_NV, -1)
    logps_N = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - log_z_N
    with torch.no_grad():
        probs_NV = torch.softmax(logits_NV, -1)
        entropy_N = log_z_N - (probs_NV * logits_NV).sum(-1)
        correct_N = logits_NV.argmax(-1) == targets_N
    return logps_N, entropy_N, correct_N


def _entropy_and_correct(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return token_stats(logits_NV, targets_N)[1:]


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) input tokens of the batch. Packed rows carry no attention mask: padding there is position 0
    not followed by position 1 (every packed example has at least two tokens, or it would train nothing)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    positions_BT = batch["position_ids"]
    real_BT = positions_BT != 0
    real_BT[:, :-1] |= positions_BT[:, 1:] == 1
    return int(real_BT.sum())


def trained_positions(batch: dict[str, torch.Tensor], ignore: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets [B, T-1] and the mask of the positions that train. In a packed row (position_ids
    present) the first token of each example is never predicted from the example before it."""
    targets_BT = batch["labels"][:, 1:]
    mask_BT = targets_BT != ignore
    if "position_ids" in batch:
        mask_BT &= batch["position_ids"][:, 1:] != 0
    return targets_BT, mask_BT


class SFTLoss(Loss):
    """Summed NLL over the labelled tokens; mean_token_accuracy and entropy as exact (sum, count) pairs;
    num_tokens, the input tokens seen in training so far (TRL's), as a running total of the `input_tokens` unit."""

    running_totals = {"num_tokens": "input_tokens"}

    #: the split-off LM head of the chunked path; None runs the plain path
    head: LMHead | None = None
    _head_checked: bool = False

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.config.loss_implementation == "chunked":
            self.head, why = LMHead.of(model)
            if self.head is None:
                log.warning("method.loss_implementation=chunked is not available for %s; using the plain path", why)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"tokens": int(trained_positions(batch, self.config.label_pad_token_id)[1].sum()),
                "input_tokens": input_tokens(batch)}

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packed rows go in with their position ids and no attention mask: transformers then keeps attention
        within each example (it starts a new one wherever the position ids restart)."""
        if "position_ids" in batch:
            return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def token_stats(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """The NLL sum over the N trained positions of the batch, and their (entropy, correctness) [N]."""
        targets_BT, mask_BT = trained_positions(batch, self.config.label_pad_token_id)
        if self.head is None:
            logits_BTV = model(**self._model_inputs(batch), use_cache=False).logits[:, :-1]
            logps_N, entropy_N, correct_N = token_stats(logits_BTV[mask_BT], targets_BT[mask_BT])
            return -logps_N.sum(), (entropy_N, correct_N)
        outputs = model(**self._model_inputs(batch), output_hidden_states=True, logits_to_keep=1, use_cache=False)
        if not self._head_checked:
            if not check_head(self.head, outputs):
                raise ConfigError("method.loss_implementation=chunked: the model's output embedding does not reproduce "
                                  "its logits (a logit transform alignkit does not know?); set method.loss_implementation=plain")
            self._head_checked = True
        hidden_BTH = outputs.hidden_states[-1][:, :-1]
        nll, _, extra = fused_token_terms(self.head, hidden_BTH[mask_BT], targets_BT[mask_BT],
                                          self.config.logits_chunk_size, stats=_entropy_and_correct)
        return nll, extra

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The chunked path runs the fused head (alignkit.blocks.fusedhead: its gradients are computed in the forward,
        nothing is recomputed); the plain path takes the model's full logits."""
        nll, extra = self.token_stats(model, batch)
        entropy_N, correct_N = extra if extra else (nll.new_zeros(0), torch.zeros(0, dtype=torch.bool))
        n = torch.tensor(float(correct_N.numel()), device=nll.device)
        metrics = {"mean_token_accuracy": (correct_N.sum().to(n.dtype), n), "entropy": (entropy_N.sum(), n)}
        return LossOutput(terms={"tokens": nll}, metrics=metrics)

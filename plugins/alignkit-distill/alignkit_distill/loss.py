"""The generalized Jensen-Shannon divergence between the teacher's and the student's next-token distributions at
each trained (completion) token, summed over the vocabulary, normalised by the trained tokens of the step (TRL's
GKD: `batchmean` over `labels != -100`).

Neither model's [batch, seq, vocab] logits exist: the teacher's reference pass keeps only its final hidden states at
the trained positions, and the student's TokenScorer (fused head in training) hands each chunk of positions'
full-vocabulary log-probs to the term, which projects the same chunk of the teacher's hidden states through the
teacher's own head. A model whose head cannot be split off (`loss_implementation: plain`) gives its full logits.
With `temperature_in_loss` both distributions are taken at `temperature` (TRL's DistillationTrainer), else at 1."""

import math

import torch
import torch.nn.functional as F

from alignkit import ConfigError, Loss, LossOutput
from alignkit.blocks.dropout import disable_dropout
from alignkit.blocks.lmhead import require_head
from alignkit.blocks.logps import TokenScorer
from alignkit.plugin.loss import at_least_fp32


def generalized_jsd(student_nV: torch.Tensor, teacher_nV: torch.Tensor, beta: float) -> torch.Tensor:
    """Per position [n]: beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student,
    of two log-prob tensors [n, V]; beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher)."""
    if beta == 0:
        return _kl(teacher_nV, student_nV)
    if beta == 1:
        return _kl(student_nV, teacher_nV)
    mixture = torch.logaddexp(student_nV + math.log1p(-beta), teacher_nV + math.log(beta))
    return beta * _kl(teacher_nV, mixture) + (1 - beta) * _kl(student_nV, mixture)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probs [n, V] (torch's kl_div with log targets, as TRL computes it)."""
    return F.kl_div(q_log, p_log, reduction="none", log_target=True).sum(-1)


class DistillLoss(Loss):
    """needs the teacher as the reference model (`model.ref_name_or_path`, required by the method's validate)."""

    needs_reference_model = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.t = config.temperature if config.temperature_in_loss else 1.0  # the divergence's temperature
        self.scorer = TokenScorer.from_config(config, temperature=self.t)
        self.teacher_scorer = TokenScorer.from_config(config)
        self._checked: set[int] = set()

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)
        self.scorer.prepare(model)

    def prepare_reference(self, ref_model: torch.nn.Module, policy: torch.nn.Module) -> None:
        """The teacher scores the student's token ids over the same vocabulary (as TRL's GKDTrainer requires)."""
        teacher, student = _vocab_size(ref_model), _vocab_size(policy)
        if teacher != student:
            raise ConfigError(f"model.ref_name_or_path: the teacher's vocabulary has {teacher} tokens, the student's "
                              f"(model.name_or_path) {student}; distill compares next-token distributions over one "
                              "vocabulary: use a teacher of the student's tokenizer family")

    def counts(self, batch: dict) -> dict[str, int]:
        return {"tokens": int((batch["labels"][:, 1:] != self.config.label_pad_token_id).sum())}

    def reference(self, ref_model: torch.nn.Module, batch: dict) -> dict:
        """The teacher at the trained positions (row-major, N of them): its final hidden states and head (chunked),
        or its logits [N, V] where its head cannot be split off."""
        select_BT = batch["labels"][:, 1:] != self.config.label_pad_token_id
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        head = self.teacher_scorer.head_of(ref_model)
        if head is None:
            return {"logits": at_least_fp32(ref_model(**inputs).logits[:, :-1][select_BT])}
        outputs = ref_model(**inputs, output_hidden_states=True, logits_to_keep=1)
        require_head(head, outputs, self._checked)
        return {"hidden": outputs.hidden_states[-1][:, :-1][select_BT], "head": head}

    def __call__(self, model: torch.nn.Module, batch: dict, ref: dict) -> LossOutput:
        beta, sums = self.config.beta, []

        def teacher(positions) -> torch.Tensor:
            logits = ref["logits"][positions] if "logits" in ref else at_least_fp32(
                ref["head"].logits(ref["hidden"][positions]))
            return torch.log_softmax(logits / self.t if self.t != 1.0 else logits, -1)

        def term(logps, positions, student_nV):
            teacher_nV = teacher(positions).to(student_nV.dtype)
            with torch.no_grad():  # the demo's measures: KL(teacher || student) and argmax agreement per token
                agree = student_nV.argmax(-1) == teacher_nV.argmax(-1)
                sums.append(torch.stack([_kl(teacher_nV, student_nV).sum(), agree.sum().to(student_nV.dtype)]))
            return generalized_jsd(student_nV, teacher_nV, beta).sum()

        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = self.scorer(model, inputs, batch["labels"], term=term, distribution=True)
        n = torch.tensor(float(s.logps.numel()), device=s.total.device)
        kl, agree = torch.stack(sums).sum(0) if sums else torch.zeros(2, device=s.total.device)
        metrics = {"kl_teacher_student": (kl, n), "token_agreement": (agree, n)}
        return LossOutput(terms={"tokens": s.total}, metrics=metrics)


def _vocab_size(model: torch.nn.Module) -> int:
    """The rows of the model's output embedding (its config's vocab_size where the head is not found)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(base.config.get_text_config().vocab_size)

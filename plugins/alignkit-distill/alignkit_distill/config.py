"""The `method:` block of distill: TRL 1.16 GKDConfig's names and defaults, plus the core sequence formatter's data
fields and the chunked loss path's."""

from typing import Literal

from pydantic import Field

from alignkit.formatters import SequenceDataConfig


class DistillConfig(SequenceDataConfig):
    """The `method:` block for distill (the teacher is `model.ref_name_or_path`)."""

    name: str = "distill"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Interpolation of the generalized Jensen-Shannon divergence: "
                        "0 is the forward KL(teacher || student), 1 the reverse KL(student || teacher).")
    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of training steps on the student's own samples "
                         "(on-policy); the others train on the data's completions (or the teacher's, with seq_kd).")
    seq_kd: bool = Field(False, description="On the steps that are not on-policy, train on completions the teacher "
                         "samples (sequence-level KD) instead of the data's.")
    temperature: float = Field(0.9, gt=0.0, description="Sampling temperature of on-policy and seq_kd completions.")
    max_new_tokens: int = Field(128, gt=0, description="Longest completion sampled by the student or the teacher.")
    temperature_in_loss: bool = Field(False, description="Take the divergence between both models' distributions at "
                                      "`temperature` (TRL's DistillationTrainer) instead of at 1 (GKDTrainer).")
    disable_dropout: bool = Field(True, description="Set p=0 on every Dropout module of the student.")
    loss_implementation: Literal["chunked", "plain"] = Field(
        "chunked", description="chunked: both models' LM heads run only at trained positions, a chunk of positions "
        "at a time, never holding [batch, seq, vocab] logits; plain: the models' full logits.")
    logits_chunk_size: int = Field(256, gt=0, description="Token positions per LM-head chunk of the chunked path (the "
                                   "divergence holds a few [chunk, vocab] tensors of both models at a time).")

    @property
    def samples_every_step(self) -> bool:
        """Every training step trains on sampled completions (the student's, or the teacher's with seq_kd): rows
        may then be prompts alone."""
        return self.lmbda == 1.0 or self.seq_kd

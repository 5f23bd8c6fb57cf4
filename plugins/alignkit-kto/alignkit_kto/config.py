"""KTO's `method:` block: TRL 1.16 KTOConfig's loss fields and defaults (the data fields come with the
"unpaired-preference" formatter)."""

from typing import Literal

from pydantic import Field, model_validator

from alignkit import MethodConfig

LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOConfig(MethodConfig):
    name: str = "kto"
    beta: float = Field(0.1, gt=0, description="Temperature of the implicit reward (deviation from the reference).")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto: the paper's loss, with the batch KL estimate as reference point; apo_zero_unpaired: "
        "the unpaired APO-zero loss (no KL term).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable (label true) examples' losses.")
    undesirable_weight: float = Field(1.0, gt=0,
                                      description="Weight of the undesirable (label false) examples' losses.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probs (completions and KL pairs) once before training.")
    kl_pairing: Literal["fixed", "batch"] = Field(
        "fixed", description="KL mismatch pairs: fixed at preprocessing by the formatter (each prompt with another "
        "example's completion); batch: each row's prompt with the previous row's completion in the same micro-batch "
        "(the batch's own completions; cannot be precomputed).")
    sync_ref_model: bool = Field(False, description="TR-KTO (as TRL's sync_ref_model): mix the policy into the "
                                 "reference every ref_model_sync_steps steps.")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="reference <- alpha * policy + (1 - alpha) * "
                                         "reference at each sync.")
    ref_model_sync_steps: int = Field(512, gt=0, description="Optimizer steps between reference syncs.")
    disable_dropout: bool = Field(True, description="Set p=0 on every Dropout module of the model.")
    loss_implementation: Literal["chunked", "plain"] = Field(
        "chunked", description="chunked: the LM head runs only at completion positions, in checkpointed chunks, never "
        "holding all logits (less memory, same numbers); plain: the model's full logits.")
    logits_chunk_size: int = Field(1024, gt=0, description="Token positions per LM-head chunk of the chunked path.")

    @property
    def uses_kl(self) -> bool:
        """Whether the loss reads the KL estimate from the mismatched prompt/completion pairs."""
        return self.loss_type == "kto"

    @model_validator(mode="after")
    def _precompute_needs_fixed_pairs(self) -> "KTOConfig":
        if self.precompute_ref_log_probs and self.uses_kl and self.kl_pairing == "batch":
            raise ValueError(
                "method.precompute_ref_log_probs=true needs method.kl_pairing=fixed: with kl_pairing=batch the KL "
                "pairs "
                "depend on how examples are batched, so reference log-probs computed before training cannot match them")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError("method.sync_ref_model updates the reference during training: it cannot be "
                             "precomputed; set method.precompute_ref_log_probs=false")
        return self

"""SFT's config: the core sequence formatter's data fields (TRL 1.x SFTConfig names and defaults) plus the loss's."""

from typing import Literal

from pydantic import Field, model_validator

from alignkit.formatters import SequenceDataConfig


class SFTConfig(SequenceDataConfig):
    """The `method:` block for SFT."""

    name: str = "sft"
    loss_implementation: Literal["chunked", "plain"] = Field(
        "chunked", description="chunked: the LM head runs only at trained positions, in checkpointed chunks, never "
        "holding all logits; plain: the model's full logits (for models whose head cannot be split off).")
    logits_chunk_size: int = Field(1024, gt=0, description="Token positions per LM-head chunk of the chunked path.")
    packing_strategy: Literal["bfd", "wrapped"] = Field(
        "bfd", description="bfd: whole examples packed best-fit decreasing (each cut to max_length), attention within "
        "each; wrapped: the examples of each preprocessing batch concatenated and cut every max_length tokens, "
        "attention across the whole row (TRL's wrapped).")
    loss_type: Literal["nll", "dft"] = Field(
        "nll", description="nll: the token negative log-likelihood; dft: each token's NLL weighted by its (detached) "
        "probability (Dynamic Fine-Tuning, arXiv 2508.05629), as TRL 1.x.")
    eval_packing: bool | None = Field(
        None, description="Pack the eval rows (null: as the training rows); false evaluates them unpacked.")

    @model_validator(mode="after")
    def _eval_packing_needs_length(self) -> "SFTConfig":
        if self.eval_packing and self.max_length is None:
            raise ValueError("method.eval_packing needs method.max_length (the length of a packed row); set one")
        return self

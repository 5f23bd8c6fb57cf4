"""SFT's config: the data fields (TRL 1.x SFTConfig names and defaults) and the loss fields."""

from typing import Literal

from pydantic import Field, model_validator

from alignkit import MethodConfig


class SFTDataConfig(MethodConfig):
    """How SFT data is tokenized, masked, truncated and packed."""

    max_length: int | None = Field(1024, gt=0, description="Maximum tokens per example (per packed row with packing); null: no truncation.")
    truncation_mode: Literal["keep_start", "keep_end"] = Field("keep_start", description="Which end of an over-long example to keep.")
    dataset_text_field: str = Field("text", description="Column holding the text of standard language-modeling rows.")
    completion_only_loss: bool | None = Field(
        None, description="Train on the completion only (prompt-completion rows); null: on for prompt-completion data, "
        "off for language-modeling data, as TRL.")
    assistant_only_loss: bool = Field(
        False, description="Train on the assistant turns only (conversational rows; needs a chat template with "
        "{% generation %} markers).")
    packing: bool = Field(
        False, description="Pack several examples into each row of up to max_length tokens; positions restart and "
        "attention stays within each example, so a packed example's loss equals its unpacked loss.")
    label_pad_token_id: int = Field(-100, description="Label value that takes no loss.")
    dataset_num_proc: int | None = Field(None, gt=0, description="Processes for dataset preprocessing.")

    @model_validator(mode="after")
    def _packing_needs_length(self) -> "SFTDataConfig":
        if self.packing and self.max_length is None:
            raise ValueError("method.packing needs method.max_length (the length of a packed row); set one, e.g. 1024")
        return self


class SFTConfig(SFTDataConfig):
    """The `method:` block for SFT."""

    name: str = "sft"
    loss_implementation: Literal["chunked", "plain"] = Field(
        "chunked", description="chunked: the LM head runs only at trained positions, in checkpointed chunks, never "
        "holding all logits; plain: the model's full logits (for models whose head cannot be split off).")
    logits_chunk_size: int = Field(1024, gt=0, description="Token positions per LM-head chunk of the chunked path.")

"""The config fields each core formatter reads (its `config_class`): a method that uses the formatter by name gets
them added to its own config. Names and defaults follow TRL 1.x's configs."""

from typing import Literal

from pydantic import Field, model_validator

from alignkit.plugin.method import MethodConfig


class TokenDataConfig(MethodConfig):
    """Fields every core formatter reads."""

    max_length: int | None = Field(1024, gt=0, description="Maximum tokens per example; null: no truncation.")
    truncation_mode: Literal["keep_start", "keep_end"] = Field(
        "keep_start", description="Which end of an over-long example to keep.")
    label_pad_token_id: int = Field(-100, description="Label value that takes no loss.")
    padding_value: int | None = Field(None,
                                      description="Pad id for input ids; null means the tokenizer's pad_token_id.")
    dataset_num_proc: int | None = Field(None, gt=0, description="Processes for dataset preprocessing.")


class SequenceDataConfig(TokenDataConfig):
    """How language-modeling and prompt-completion rows are tokenized, masked, truncated and packed (TRL 1.x's
    rules)."""

    dataset_text_field: str = Field("text", description="Column holding the text of standard language-modeling rows.")
    completion_only_loss: bool | None = Field(
        None, description="Train on the completion only; null: on for prompt-completion rows (as TRL 1.x).")
    assistant_only_loss: bool = Field(
        False, description="Train on the assistant turns of conversations only (marked by the chat template's "
        "{% generation %} blocks, or found by rendering each turn when the template has none).")
    packing: bool = Field(
        False, description="Pack several examples into each row of up to max_length tokens (best fit decreasing); "
        "position_ids restart per example and batches carry no attention_mask, so attention stays inside each example.")

    @model_validator(mode="after")
    def _packing_needs_length(self) -> "SequenceDataConfig":
        if self.packing and self.max_length is None:
            raise ValueError("method.packing needs method.max_length (the length of a packed row); set one, e.g. 1024")
        return self


class UnpairedDataConfig(TokenDataConfig):
    """How unpaired preference rows (prompt, completion, label) are tokenized, with the KL mismatch pairs."""

    kl_group_size: int | None = Field(
        None, ge=2, description="The KL completions rotate by one within consecutive groups of this many examples "
        "(TRL: per_device_train_batch_size); null: within each preprocessing batch.")


class PromptOnlyDataConfig(TokenDataConfig):
    """How prompt-only rows are tokenized; every other column is kept for reward functions."""

    max_length: int | None = Field(None, gt=0, description="Maximum prompt tokens; null: no truncation.")
    truncation_mode: Literal["keep_start", "keep_end"] = Field(
        "keep_end", description="Which end of an over-long prompt to keep.")


class PreferenceDataConfig(MethodConfig):
    """How PreferenceFormatter tokenizes, truncates and pads preference pairs."""

    max_length: int = Field(1024, gt=0, description="Maximum prompt + completion tokens.")
    max_prompt_length: int = Field(512, gt=0,
                                   description="Prompt cap, applied only when prompt + longer answer exceeds "
                                   "max_length.")
    max_completion_length: int | None = Field(None, gt=0,
                                              description="Completion cap; used only for encoder-decoder models (null: "
                                              "128, as TRL).")
    truncation_mode: Literal["keep_end", "keep_start"] = Field("keep_end",
                                                               description="Which end of an over-long prompt to keep.")
    label_pad_token_id: int = Field(-100, description="Label value that takes no loss.")
    padding_value: int | None = Field(None,
                                      description="Pad id for input ids; null means the tokenizer's pad_token_id.")
    dataset_num_proc: int | None = Field(None, gt=0, description="Processes for dataset preprocessing.")
    is_encoder_decoder: bool | None = Field(None, description="Format for an encoder-decoder model; null: read it from "
                                            "the model's config.")

    @model_validator(mode="after")
    def _prompt_fits(self) -> "PreferenceDataConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"method.max_prompt_length ({self.max_prompt_length}) must be smaller than method.max_length "
                f"({self.max_length}), or no tokens are left for the answers")
        return self

"""ORPO's config: the seed's fields and defaults (TRL v0.15.2 ORPOMethodConfig), plus `nll_scope`.

The data fields sit in PreferenceDataConfig so that other preference methods can subclass it and
reuse PreferenceFormatter.
"""

from typing import Literal

from pydantic import Field, model_validator

from alignkit import MethodConfig


class PreferenceDataConfig(MethodConfig):
    """How PreferenceFormatter tokenizes, truncates and pads preference pairs."""

    max_length: int = Field(1024, gt=0, description="Maximum prompt + completion tokens.")
    max_prompt_length: int = Field(512, gt=0, description="Prompt cap, applied only when prompt + longer answer exceeds max_length.")
    max_completion_length: int | None = Field(None, gt=0, description="Completion cap; used only for encoder-decoder models (null: 128, as TRL).")
    truncation_mode: Literal["keep_end", "keep_start"] = Field("keep_end", description="Which end of an over-long prompt to keep.")
    label_pad_token_id: int = Field(-100, description="Label value that takes no loss.")
    padding_value: int | None = Field(None, description="Pad id for input ids; null means the tokenizer's pad_token_id.")
    dataset_num_proc: int | None = Field(None, gt=0, description="Processes for dataset preprocessing.")
    is_encoder_decoder: bool | None = Field(None, description="Format for an encoder-decoder model; null: read it from the model's config.")

    @model_validator(mode="after")
    def _prompt_fits(self) -> "PreferenceDataConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"method.max_prompt_length ({self.max_prompt_length}) must be smaller than method.max_length "
                f"({self.max_length}), or no tokens are left for the answers")
        return self


class ORPOMethodConfig(PreferenceDataConfig):
    """The `method:` block for ORPO. Model-loading fields live in the core `model:` section."""

    name: str = "orpo"
    beta: float = Field(0.1, ge=0, description="Weight of the odds-ratio term (the paper's lambda, xfactlab's alpha).")
    disable_dropout: bool = Field(True, description="Set p=0 on every Dropout module of the model.")
    generate_during_eval: bool = Field(
        False, description="At each eval, sample completions for a few eval prompts into output_dir/completions.jsonl and table-capable trackers.")
    nll_scope: Literal["sequence", "completion"] = Field(
        "sequence", description="Tokens the NLL term covers: the whole chosen sequence (TRL, paper) or its completion only.")
    loss_implementation: Literal["chunked", "plain"] = Field(
        "chunked", description="chunked: the LM head runs only at scored positions, in checkpointed chunks, never "
        "holding all logits (less memory, same numbers); plain: the model's full logits, as TRL (for debugging).")
    logits_chunk_size: int = Field(1024, gt=0, description="Token positions per LM-head chunk of the chunked path.")
    share_prompt: bool | None = Field(
        None, description="Run each pair as one row, [prompt, chosen, rejected], the common prefix computed once "
        "(chunked path, sdpa or eager attention). null: on where the model supports it.")
    padding_free: bool = Field(
        False, description="Run each batch's real tokens as one packed row with per-sequence position ids (needs the "
        "chunked path and sdpa/eager/flex/flash attention). logits/* then average real positions only.")

"""ORPO's config: the seed's fields and defaults (TRL v0.15.2 ORPOMethodConfig), plus `nll_scope`.

The data fields are the core's PreferenceDataConfig (the `preference` formatter's, alignkit.formatters).
"""

from typing import Literal

from pydantic import Field

from alignkit.formatters import PreferenceDataConfig


class ORPOMethodConfig(PreferenceDataConfig):
    """The `method:` block for ORPO. Model-loading fields live in the core `model:` section."""

    name: str = "orpo"
    beta: float = Field(0.1, ge=0, description="Weight of the odds-ratio term (the paper's lambda, xfactlab's alpha).")
    disable_dropout: bool = Field(True, description="Set p=0 on every Dropout module of the model.")
    generate_during_eval: bool = Field(
        False, description="At each eval, sample completions for a few eval prompts into output_dir/completions.jsonl "
        "and table-capable trackers.")
    nll_scope: Literal["sequence", "completion"] = Field(
        "sequence",
        description="Tokens the NLL term covers: the whole chosen sequence (TRL, paper) or its completion only.")
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

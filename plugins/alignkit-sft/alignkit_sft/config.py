"""SFT's config: the core sequence formatter's data fields (TRL 1.x SFTConfig names and defaults) plus the loss's."""

from typing import Literal

from pydantic import Field

from alignkit.formatters import SequenceDataConfig


class SFTConfig(SequenceDataConfig):
    """The `method:` block for SFT."""

    name: str = "sft"
    loss_implementation: Literal["chunked", "plain"] = Field(
        "chunked", description="chunked: the LM head runs only at trained positions, in checkpointed chunks, never "
        "holding all logits; plain: the model's full logits (for models whose head cannot be split off).")
    logits_chunk_size: int = Field(1024, gt=0, description="Token positions per LM-head chunk of the chunked path.")

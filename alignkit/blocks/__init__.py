"""What a plugin computes with: text and token blocks, log-prob scorers, the LM head and fused head,
prefix sharing, demo data helpers, the value head."""

from alignkit.blocks.valuehead import ValueHead, value_head

__all__ = ["ValueHead", "value_head"]

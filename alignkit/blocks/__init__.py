"""What a plugin computes with: text and token blocks, log-prob scorers, the LM head and fused head,
prefix sharing, demo data helpers."""

"""GRPO (Shao et al., arXiv 2402.03300) with the DAPO and Dr. GRPO token normalisations, as an alignkit method."""

from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.loss import GRPOLoss

__all__ = ["GRPOConfig", "GRPOLoss"]

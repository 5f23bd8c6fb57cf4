"""RLOO's formatter: prompt rows with their other columns for the rewards, and the demo's supervised warm-up on the
core's sorting task (method.sft_warmup_steps, which the demo sets) so that RL starts from a model that sometimes gets
it right."""

import torch

from alignkit.blocks.demo import sft_warmup
from alignkit.formatters import PromptOnlyFormatter


class RLOOFormatter(PromptOnlyFormatter):
    """`prompt` rows (standard or conversational) with every other column kept for the rewards; with
    method.sft_warmup_steps, that many supervised steps on the demo task before RL."""

    def check_data(self, dataset, source: str, pm=None, run=None) -> None:
        """The data has every column the configured rewards read (alignkit.online.rewards.check_data)."""
        from alignkit import get_plugin_manager
        from alignkit.online.rewards import MODEL_PREFIX, RewardRegistry, check_data

        names = [n for n in self.config.reward_funcs if not n.startswith(MODEL_PREFIX)]
        check_data(RewardRegistry.from_plugins(pm or get_plugin_manager()).select(names), dataset, source)

    def prepare_model(self, model) -> None:
        steps = getattr(self.config, "sft_warmup_steps", 0)
        if steps:
            with torch.random.fork_rng():
                sft_warmup(model, self.tokenizer, steps)

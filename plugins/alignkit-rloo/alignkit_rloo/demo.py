"""The built-in demo: prompts to sort digits (`builtin:rloo-sort`, `answer` = the sorted list, from the core's demo
lists), and a few seconds of supervised warm-up on its train split so that RL starts from a model that sometimes
gets it right (method.sft_warmup_steps, which the demo sets)."""

import logging
import time

import datasets
import torch

from alignkit.blocks import demo
from alignkit.formatters import PromptOnlyFormatter

log = logging.getLogger(__name__)


def rows(split: str) -> list[dict[str, str]]:
    """`prompt` ("sort: 3 1 2 =") and `answer` (" 1 2 3") for the lists of `split`."""
    return [{"prompt": demo.prompt(d), "answer": " " + demo.words(sorted(d))} for d in demo.split_lists(split)]


def load(split: str) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows(split))


def sft_warmup(model, tokenizer, steps: int, lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> None:
    """`steps` of next-token training on prompt + answer + EOS (loss on the answer only), in place, from its own
    seeded generator (the same start in every process and after a resume)."""
    start, g = time.time(), torch.Generator().manual_seed(seed)
    encoded = []
    for r in rows("train"):
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p + a, [-100] * len(p) + a))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    was_training = model.training
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.tensor([encoded[i][0] + [tokenizer.pad_token_id] * (width - len(encoded[i][0])) for i in idx])
        labels = torch.tensor([encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in idx])
        mask = torch.tensor([[1] * len(encoded[i][0]) + [0] * (width - len(encoded[i][0])) for i in idx])
        loss = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                     labels=labels.to(model.device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    log.info("demo warm-up: %d supervised steps in %.1fs (last loss %.3f)", steps, time.time() - start, loss.item())


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

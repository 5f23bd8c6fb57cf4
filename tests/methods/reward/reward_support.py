"""Shared support of the reward method's tests: a tiny training run and the run's formatted eval pairs."""

import alignkit_reward
import torch

import alignkit
from alignkit.testing import plugin_manager
from helpers import fast


def reward_pm(*more):
    return plugin_manager(alignkit_reward, *more)


def train(tmp_path, data="builtin:sort-reward", steps=12, pm=None, **sections):
    """A short reward run on `data` (64 train pairs, 16 eval pairs); `sections` replace whole config sections."""
    pm = pm or reward_pm()
    config = fast(tmp_path, max_steps=steps, learning_rate=3e-3)
    config["data"] = {"train": data, "max_train_samples": 64, "max_eval_samples": 16}
    config.update(sections)
    return pm, alignkit.run("reward", config, plugins=pm)


def scores(model, rows_ids, pad_id=0) -> torch.Tensor:
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows_ids], batch_first=True, padding_value=pad_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows_ids], batch_first=True)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()

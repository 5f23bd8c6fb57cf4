"""RLOOConfig / RLOOTrainer: TRL 1.16's RLOO trainer surface on alignkit's engine (`from alignkit_trl import ...`).

RLOOConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments, TRL's online fields and the RLOO
fields); each maps to alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the
weights, or is refused with the reason. RLOOTrainer takes reward functions as TRL does (alignkit.trainer_facade.
online). Imported on first use only, never by `alignkit run`.
"""

from typing import Any

import alignkit_rloo
from alignkit.trainer_facade.args import table_config
from alignkit.trainer_facade.online import ONLINE_IGNORED, ONLINE_KEYS, ONLINE_ROWS, ONLINE_UNSUPPORTED, OnlineTrainer

#: TRL 1.16's RLOOConfig fields beyond the online ones
RLOO_ROWS: list[tuple[str, Any, Any]] = [
    ("num_generations", int | None, 2), ("beta", float, 0.05), ("normalize_advantages", bool, False),
    ("reward_clip_range", tuple[float, float] | None, None),
]

RLOOConfig = table_config(
    "RLOOConfig", ONLINE_ROWS + RLOO_ROWS, alignkit_rloo, __name__,
    "TRL 1.16's RLOOConfig: learning_rate 1e-6, num_generations 2, beta 0.05, max_completion_length 512, ...",
    method_keys=ONLINE_KEYS, unsupported=ONLINE_UNSUPPORTED, ignored=ONLINE_IGNORED,
)


class RLOOTrainer(OnlineTrainer):
    """TRL 1.16's RLOOTrainer on alignkit's engine, rollout and RLOO loss."""

    _tag_names = ["trl", "rloo"]
    method_name, method_plugin, config_class, suffix = "rloo", alignkit_rloo, RLOOConfig, "RLOO"

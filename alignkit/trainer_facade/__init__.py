"""alignkit.trainer_facade: transformers.Trainer's surface on alignkit's engine, shared by the TRL-style trainers
the method plugins offer (`from alignkit_trl import SFTTrainer, ...`). Imported only by those trainers, never by the
core or by `alignkit run`.

- `FacadeTrainer`: base of a TRL-style trainer: builds the engine from TRL-style args, train / evaluate /
  save_model / push_to_hub, TrainerState, callbacks and log history.
- `TrainerSurface`: the Trainer methods that are not about training (logging, callbacks, the Hub, dataloaders).
- `TrainerFlow`: the engine's Schedule and lifecycle plugin that runs transformers' callbacks and control flags.
- `LogitsEvaluation`: compute_metrics on the model's logits (Trainer's evaluation_loop), for the trainers whose
  predictions are logits.
- `TRLColumns`: mixin showing a trainer's tokenized rows under TRL's column names too (e.g. prompt_ids).
- `TrainingArgumentsBridge`: base of a TRL 1.x config class (transformers.TrainingArguments plus the
  method's fields) that maps itself to alignkit keys, refusing what alignkit cannot honour.
"""

from alignkit.trainer_facade.args import TrainingArgumentsBridge
from alignkit.trainer_facade.columns import TRLColumns
from alignkit.trainer_facade.flow import TrainerFlow
from alignkit.trainer_facade.predict import LogitsEvaluation
from alignkit.trainer_facade.surface import TrainerSurface
from alignkit.trainer_facade.trainer import FacadeTrainer

__all__ = ["FacadeTrainer", "LogitsEvaluation", "TrainerFlow", "TrainerSurface", "TrainingArgumentsBridge",
           "TRLColumns"]

"""A training method: its name, config model, data formatter and loss, as a plugin registers it."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from alignkit.online.rollout import Rollout
    from alignkit.plugin.formatter import DataFormatter
    from alignkit.plugin.loss import Loss


#: the model kinds a method may declare (Method.model_kind)
MODEL_KINDS = ("causal-lm", "sequence-classifier", "token-classifier", "causal-lm-value-head", "image-text-to-text")


class MethodConfig(BaseModel):
    """Base of every method's config (the `method:` block). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str = Field(description="The method to train with, as listed by `alignkit methods`.")


@dataclass(frozen=True)
class Method:
    """What a plugin hands to `register(...)` in its `register_methods` hook.

    `formatter(config, tokenizer)` builds the DataFormatter and `loss(config)` the Loss. Either may be
    given by its registered name (e.g. formatter="preference") to reuse another plugin's part.
    `defaults` sets core keys for this method unless the user sets them, e.g. {"train.learning_rate": 1e-6}.

    Demo: `demo_data` names a built-in dataset (registered with the `register_datasets` hook, by this or
    another plugin) used as data.train when the user gives none, its "test" split as the held-out eval set;
    `demo_defaults` (dotted core keys) apply when model and data are both built-in, so that the demo learns
    in seconds. `progress_metrics` are the metrics the progress bar shows besides the loss.
    `rollout` (optional) is a class built once as `rollout(config, tokenizer)`; the engine calls it on each
    micro-batch of prompt rows before `counts`, the reference and the loss (online methods).
    `validate` (optional) is called as `validate(config)` with the whole validated RunConfig before anything is
    loaded or written; it refuses a setting the method cannot run with by raising alignkit.ConfigError (one
    line naming the key, shown as `alignkit: error: ...`, exit code 2). See docs/writing-a-method.md.

    `model_kind` is the model the core loads, trains (LoRA included) and saves for this method: "causal-lm" (the
    default); "sequence-classifier" (AutoModelForSequenceClassification with `num_labels` outputs, e.g. a reward
    model) or "token-classifier" (AutoModelForTokenClassification, e.g. a process reward model): with LoRA their head
    is trained in full and saved with the adapter, and `alignkit generate` and `chat` refuse them; or
    "causal-lm-value-head" (a causal LM with alignkit.blocks.ValueHead under `model.v_head`, one value per token,
    read with alignkit.blocks.value_head(model); saved as v_head.summary.* in the same safetensors).

    `source` and `version` (the plugin's distribution) and `plugin` (the pluggy name of the plugin that
    registered it, whose lifecycle hooks run for this method's runs) are filled in by the registry.
    """

    name: str
    config: type[MethodConfig]
    formatter: "type[DataFormatter] | str"
    loss: "type[Loss] | str"
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    citation: str = ""
    demo_data: str | None = None
    demo_defaults: Mapping[str, Any] = field(default_factory=dict)
    progress_metrics: tuple[str, ...] = ()
    rollout: "type[Rollout] | None" = None  # alignkit.online.Rollout, checked when registered
    validate: "Callable[[Any], None] | None" = None
    model_kind: str = "causal-lm"
    num_labels: int = 1
    source: str = ""
    version: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        if not self.name.replace("-", "_").isidentifier():
            raise ValueError(f"method name {self.name!r} must be letters, digits, '_' or '-'")
        if not (isinstance(self.config, type) and issubclass(self.config, MethodConfig)):
            raise TypeError(f"method {self.name!r}: config must subclass alignkit.MethodConfig")
        if self.validate is not None and not callable(self.validate):
            raise TypeError(f"method {self.name!r}: validate must be a callable validate(config), got "
                            f"{type(self.validate).__name__}")
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"method {self.name!r}: model_kind {self.model_kind!r} is not one of "
                             f"{', '.join(MODEL_KINDS)}")
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise ValueError(f"method {self.name!r}: num_labels must be a positive integer, got {self.num_labels!r}")
        if self.demo_data is not None and self.demo_data.startswith("builtin:"):
            raise ValueError(f"method {self.name!r}: demo_data is a dataset name without 'builtin:' "
                             f"(got {self.demo_data!r})")

"""A training method: its name, config model, data formatter and loss, as a plugin registers it."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from alignkit.data import DataFormatter
    from alignkit.loss import Loss


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
    `source` and `version` are filled in by the registry from the plugin's distribution.
    """

    name: str
    config: type[MethodConfig]
    formatter: "type[DataFormatter] | str"
    loss: "type[Loss] | str"
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    citation: str = ""
    source: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        if not self.name.replace("-", "_").isidentifier():
            raise ValueError(f"method name {self.name!r} must be letters, digits, '_' or '-'")
        if not (isinstance(self.config, type) and issubclass(self.config, MethodConfig)):
            raise TypeError(f"method {self.name!r}: config must subclass alignkit.MethodConfig")

"""The core's formatters for every dataset type users bring (TRL's conventions), registered by the core's own
built-in plugin (this module) under neutral names any method may use:

| name | rows | features |
|---|---|---|
| `language-modeling` | `text` or `messages` | `input_ids`, `labels` (+ `position_ids` when packed) |
| `prompt-completion` | `prompt`, `completion` | `input_ids`, `labels` (+ `position_ids` when packed) |
| `unpaired-preference` | `prompt`, `completion`, `label`; or paired `chosen`/`rejected` | `prompt_input_ids`, `completion_input_ids`, `completion_labels`, `label`, `KL_completion_*` |
| `preference` | `prompt`/`chosen`/`rejected` (explicit or implicit prompt) | `prompt_input_ids`, `chosen_input_ids`/`_labels`, `rejected_input_ids`/`_labels` |
| `prompt-only` | `prompt` and any other columns | `prompt_input_ids` and the row's columns |

It also registers the preference methods' demo data, `builtin:sort` and `builtin:sort-chat` (alignkit.blocks.demo), and
the vision-language demo data `builtin:shapes-pairs` and `builtin:shapes-prompts` (alignkit.blocks.shapes).
"""  # noqa: E501 (a markdown table: its rows cannot wrap)

from alignkit.blocks.demo import SORT_DATASETS, SORT_PROMPTS, load_sort, load_sort_prompts
from alignkit.blocks.shapes import SHAPES_PAIRS, SHAPES_PROMPTS, load_shapes_pairs, load_shapes_prompts
from alignkit.formatters.config import (
    PreferenceDataConfig,
    PromptOnlyDataConfig,
    SequenceDataConfig,
    TokenDataConfig,
    UnpairedDataConfig,
)
from alignkit.formatters.preference import PreferenceFormatter
from alignkit.formatters.prompt_only import PromptOnlyFormatter
from alignkit.formatters.sequence import (
    LanguageModelingFormatter,
    PromptCompletionFormatter,
    SequenceFormatter,
    prompt_completion_ids,
)
from alignkit.formatters.unpaired import UnpairedPreferenceFormatter
from alignkit.plugin.hookspecs import hookimpl

FORMATTERS = {
    "language-modeling": LanguageModelingFormatter,
    "prompt-completion": PromptCompletionFormatter,
    "unpaired-preference": UnpairedPreferenceFormatter,
    "prompt-only": PromptOnlyFormatter,
    "preference": PreferenceFormatter,
}


@hookimpl
def register_formatters(register):
    for name, formatter in FORMATTERS.items():
        register(name, formatter)


@hookimpl
def register_datasets(register):
    for name in SORT_DATASETS:
        register(name, lambda split, name=name: load_sort(name, split))
    register(SORT_PROMPTS, load_sort_prompts)
    from alignkit.online.calculator import ARITHMETIC, load_arithmetic  # the calculator environment's demo data

    register(ARITHMETIC, load_arithmetic)
    register(SHAPES_PAIRS, load_shapes_pairs)
    register(SHAPES_PROMPTS, load_shapes_prompts)


__all__ = [
    "FORMATTERS", "LanguageModelingFormatter", "PreferenceDataConfig", "PreferenceFormatter",
    "PromptCompletionFormatter", "PromptOnlyDataConfig",
    "PromptOnlyFormatter", "SequenceDataConfig", "SequenceFormatter", "TokenDataConfig", "UnpairedDataConfig",
    "UnpairedPreferenceFormatter", "prompt_completion_ids",
]

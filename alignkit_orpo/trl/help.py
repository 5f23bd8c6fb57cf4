"""Help texts for the TRL-style config dataclasses, so that `HfArgumentParser`-based scripts (examples/orpo.py)
show what each flag does and its default in `--help`."""

import dataclasses
import types

#: for a field neither source describes
FALLBACK = "As TRL v0.15.2's ORPOConfig field of this name (mapped to alignkit, carried out, or refused; see the docs)."


def descriptions() -> dict[str, str]:
    """Field name -> description: transformers.TrainingArguments' help texts, then the alignkit ORPO config's
    descriptions (beta, max_length, ...) for the fields TrainingArguments lacks."""
    from transformers import TrainingArguments

    from alignkit_orpo.config import ORPOMethodConfig

    texts = {name: info.description for name, info in ORPOMethodConfig.model_fields.items() if info.description}
    texts.update({f.name: f.metadata["help"] for f in dataclasses.fields(TrainingArguments) if f.metadata.get("help")})
    return texts


def with_help(cls: type) -> type:
    """Give every field of dataclass `cls` without a help text one (`descriptions`, else FALLBACK)."""
    texts = descriptions()
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            f.metadata = types.MappingProxyType({**f.metadata, "help": texts.get(f.name, FALLBACK)})
    return cls

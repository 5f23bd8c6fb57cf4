"""`alignkit format`: the formatter's output as a person reads it, for any method."""

from alignkit.config import RunConfig, train_data
from alignkit.engine.data import load_data, prepare
from alignkit.engine.modeling import load_tokenizer
from alignkit.formatters.vision import processor_of
from alignkit.plugin.formatter import infer_token_fields
from alignkit.plugin.method import Method


def _image_token(tokenizer) -> int | None:
    processor = processor_of(tokenizer)
    return getattr(processor, "image_token_id", None) if processor is not None else None


def _images(tokenizer, ids: list[int]) -> int:
    """How many images a row shows: its runs of image tokens."""
    image = _image_token(tokenizer)
    return sum(1 for i, t in enumerate(ids) if t == image and (i == 0 or ids[i - 1] != image))


def _render(tokenizer, ids: list[int], labels: list[int] | None, ignore: int, color: bool) -> str:
    """Tokens in order; those whose label is trained (not `ignore`) are [[marked]] (or green); each run of a
    vision-language model's image tokens is one `[image: N tokens]` placeholder."""
    out, image = [], _image_token(tokenizer)
    for i, token in enumerate(ids):
        if token == image:
            if i > 0 and ids[i - 1] == image:
                continue
            n = next((j for j in range(i, len(ids)) if ids[j] != image), len(ids)) - i
            out.append(f"[image: {n} tokens]")
            continue
        text = tokenizer.decode([token])
        trained = labels is not None and i < len(labels) and labels[i] != ignore
        out.append((f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]") if trained else text)
    return "".join(out)


def show_examples(config: RunConfig, method: Method, count: int, color: bool = False) -> str:
    """The first `count` training examples: each formatted sequence, what takes loss, lengths, truncation."""
    tokenizer = load_tokenizer(config.model)
    formatter = method.formatter(config.method, tokenizer)
    source = train_data(config)
    raw = load_data(source, config.data.train_split)
    raw = raw.select(range(min(count, len(raw))))
    formatted, report = prepare(raw, formatter, source)
    fields = formatter.token_fields() or infer_token_fields(formatted.column_names)
    # the label that takes no loss (as alignkit.blocks.logps)
    ignore = getattr(config.method, "label_pad_token_id", -100)
    lines = [f"{source}: {report.kept} shown, {report.truncated} truncated, {report.dropped} dropped "
             f"by the {method.name} formatter; {'green' if color else '[[bracketed]]'} tokens are labelled targets "
             f"(label != {ignore})", ""]
    for index, features in enumerate(formatted):
        lines.append(f"--- example {index}")
        lines += formatter.describe(features)
        for key, labels_key in fields:
            labels = features.get(labels_key) if labels_key else None
            trained = sum(1 for x in (labels or []) if x != ignore)
            name = key.removesuffix("input_ids").removesuffix("ids").removesuffix("_") or "input"
            if _images(tokenizer, features[key]):
                n = _images(tokenizer, features[key])
                lines.append(f"{name}: {n} image{'s' * (n != 1)}")
            lines.append(f"{name} ({len(features[key])} tokens, {trained} labelled):")
            lines.append("  " + _render(tokenizer, features[key], labels, ignore, color).replace("\n", "\n  "))
        lines.append("")
    return "\n".join(lines) + "\n"

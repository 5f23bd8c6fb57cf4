"""Rows with images (TRL's multimodal dataset shapes) through the model's processor.

A row holds an `images` column: a list of PIL images, file paths (relative to the data file: the core's loader makes
them absolute), or `datasets.Image` values; its conversational content may hold `{"type": "image"}` and
`{"type": "text", "text": ...}` parts (all-string conversations get their images before the first user turn's text,
as TRL's `prepare_multimodal_messages`), standard text holds the processor's image token. The processor renders the
image placeholders into image tokens; what it returns besides the ids (pixel values, and `pixel_attention_mask`,
`image_grid_thw`, ... whatever the model reads) travels as features and, collated, in the batch (`vision_inputs`
picks it for the forward). Only vision-language models carry a processor (`processor_of`).
"""

import io
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import DataError

IMAGES = "images"
#: the processor outputs a vision-language model's forward reads besides the ids
VISION_INPUTS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes")


def processor_of(tokenizer):
    """The processor a vision-language model's tokenizer carries (alignkit.load_tokenizer); None for text models."""
    return getattr(tokenizer, "processor", None)


def vision_inputs(batch: dict) -> dict:
    """The batch's image inputs for the model's forward (empty for text rows)."""
    return {k: batch[k] for k in VISION_INPUTS if k in batch}


def has_images(example: dict[str, Any]) -> bool:
    return bool(example.get(IMAGES))


def holds_images(ds) -> bool:
    """Whether a dataset's `images` column can hold images (its type is not all-null), read from its features."""
    feature = ds.features.get(IMAGES)
    inner = getattr(feature, "feature", feature)
    return feature is not None and getattr(inner, "dtype", None) != "null"


def resolve_paths(ds, base: Path):
    """A loaded data file's `images` paths made absolute, relative to the file's folder `base`."""
    feature = ds.features.get(IMAGES)
    if getattr(getattr(feature, "feature", feature), "dtype", None) not in ("string", "large_string"):
        return ds  # no column of paths (PIL images, datasets.Image values, no images)

    def absolute(row):
        return {IMAGES: [str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                         for v in row[IMAGES] or []]}
    return ds.map(absolute, desc="image paths")


def load_image(item, index: int):
    """One `images` item as an RGB PIL image; a DataError naming the item for a missing or undecodable file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, dict) and (item.get("bytes") or item.get("path")):  # datasets.Image, not decoded
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        shown = item.get("path") or "its bytes"
    elif isinstance(item, str):
        source = shown = item
    else:
        raise DataError(f"'images' item {index} must be an image, a file path or a datasets.Image value, got "
                        f"{type(item).__name__}")
    if isinstance(source, str) and not Path(source).is_file():
        raise DataError(f"'images' item {index}: no such image file {source}")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"'images' item {index}: {shown} is not an image Pillow can decode ({first})") from None


def _parts(content) -> list:
    return content if isinstance(content, list) else []


def count_placeholders(value, image_token: str) -> int:
    """Image placeholders in a string (the processor's image token) or conversation (`{"type": "image"}` parts)."""
    if isinstance(value, str):
        return value.count(image_token)
    return sum(1 for m in value for p in _parts(m.get("content")) if isinstance(p, dict) and p.get("type") == "image")


def with_image_parts(messages: list[dict], n_images: int) -> list[dict]:
    """An all-string conversation with `n_images` image parts before the first user turn's text (TRL's rule); one
    with content parts unchanged."""
    if not n_images or any(isinstance(m.get("content"), list) for m in messages):
        return messages
    out, placed = [], False
    for m in messages:
        if m["role"] == "user" and not placed:
            m = {**m, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": m["content"]}]}
            placed = True
        out.append(m)
    return out


class VisionRows:
    """The processor side of a formatter: images loaded and checked, text + images -> ids and image features, image
    features collated. `keys` are the processor's image outputs; `batched` those with one entry per text (stacked,
    padded with zero images) rather than one per image or patch (concatenated)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.image_token = getattr(processor, "image_token", "<image>")
        self._probe()

    def _probe(self) -> None:
        """Which outputs the processor gives for images and how they batch: rows of one and of two images tell."""
        from PIL import Image

        img = Image.new("RGB", (8, 8))
        out = self.processor(images=[[img], [img, img]], text=[self.image_token, self.image_token * 2],
                             padding=True, return_tensors="pt")
        self.keys = [k for k in out if k in VISION_INPUTS]
        self.batched = [k for k in self.keys if out[k].shape[0] == 2]
        self.dtypes = {k: out[k].dtype for k in self.keys}
        self.dims = {k: out[k].dim() - (k in self.batched) for k in self.keys}

    def output_features(self) -> dict:
        """The datasets feature types of the image features (nested lists of float32, int64 or bool)."""
        import datasets

        def nested(k):
            dtype = self.dtypes[k]
            value = datasets.Value("float32" if dtype.is_floating_point else "bool" if dtype == torch.bool else "int64")
            for _ in range(self.dims[k]):
                value = datasets.Sequence(value)
            return value
        return {k: nested(k) for k in self.keys}

    def images(self, example: dict[str, Any]) -> list:
        items = example.get(IMAGES) or []
        if not isinstance(items, list):
            items = [items]
        return [load_image(item, i) for i, item in enumerate(items)]

    def check_count(self, values: list, n_images: int) -> None:
        """The placeholders across `values` (strings or conversations) must match the row's images."""
        n = sum(count_placeholders(v, self.image_token) for v in values)
        if n != n_images:
            raise DataError(f"the row has {n} image placeholder{'s' * (n != 1)} ({{\"type\": \"image\"}} parts or "
                            f"{self.image_token!r} in text) and {n_images} image{'s' * (n_images != 1)} in 'images'; "
                            "give one placeholder per image")

    def encode(self, text: str, images: list) -> tuple[list[int], dict[str, list]]:
        """(ids, image features) of one text with its images expanded by the processor (no special tokens added:
        a rendered chat template or the data writes its own)."""
        out = self.processor(images=[images] if images else None, text=[text], add_special_tokens=False,
                             return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        return ids, self.features(out if images else None)

    def features(self, out) -> dict[str, list]:
        """One row's image features as lists (empty for a row without images)."""
        if out is None:
            return {k: [] for k in self.keys}
        return {k: (out[k][0] if k in self.batched else out[k]).tolist() for k in self.keys}

    def image_tokens(self, ids: list[int]) -> int:
        return sum(1 for i in ids if i == self.processor.image_token_id)

    def collate(self, features: list[dict[str, Any]], repeat: int = 1) -> dict[str, torch.Tensor]:
        """The batch's image inputs (nothing when no row has images); `repeat` > 1: the rows' images again for each
        further block of rows (e.g. [chosen; rejected])."""
        if not any(f.get(k) for f in features for k in self.keys):
            return {}
        features = list(features) * repeat
        batch = {}
        for k in self.keys:
            rows = [torch.tensor(f[k], dtype=self.dtypes[k]) for f in features]
            if k in self.batched:
                shape = next(r.shape for r in rows if r.numel())
                rows = [r if r.numel() else torch.zeros((0, *shape[1:]), dtype=self.dtypes[k]) for r in rows]
                n = max(len(r) for r in rows)
                batch[k] = torch.stack([torch.cat([r, r.new_zeros((n - len(r), *shape[1:]))]) for r in rows])
            else:
                batch[k] = torch.cat([r for r in rows if r.numel()])
        return batch


def text_only_model(n_images: int) -> DataError:
    return DataError(f"the row has {n_images} image{'s' * (n_images != 1)} in 'images', but the model is text-only "
                     "(it has no processor): use a vision-language model (model.name_or_path, e.g. builtin:tiny-vlm) "
                     "or drop the 'images' column")


def sequence_tokens(fmt, example: dict[str, Any]) -> tuple[list[int], list[int], dict[str, list]]:
    """(ids, trained mask, image features) of a language-modeling or prompt-completion row with images, for the
    SequenceFormatter `fmt`, as TRL 1.x's vision collator builds them: the rendered text (or the text as given) with
    its images through the processor, without an EOS added; prompt-completion rows: the prompt with the images, then
    the completion's own ids."""
    from alignkit.blocks.text import column, is_conversation, render, render_split, same_format

    vision, c, tokenizer = fmt._vision, fmt.config, fmt.tokenizer
    if vision is None:
        raise text_only_model(len(example[IMAGES]))
    if c.assistant_only_loss:
        raise DataError("method.assistant_only_loss=true is not supported for rows with images yet; set it to false")
    images = vision.images(example)
    if fmt.shape(example) == "language-modeling":
        name = "messages" if example.get("messages") is not None else c.dataset_text_field
        value = column(example, name)
        if c.completion_only_loss:
            raise DataError(f"method.completion_only_loss=true needs prompt-completion rows; this row is language "
                            f"modeling ('{name}'): set completion_only_loss to null or false")
        if is_conversation(value):
            value = with_image_parts(value, len(images))
        vision.check_count([value], len(images))
        ids, features = vision.encode(value if isinstance(value, str) else render(tokenizer, value), images)
        return ids, [1] * len(ids), features
    needs = "prompt-completion rows need 'prompt' and 'completion'"
    prompt, completion = column(example, "prompt", needs), column(example, "completion", needs)
    if same_format(("prompt", prompt), ("completion", completion)):
        prompt = with_image_parts(prompt, len(images))
        vision.check_count([prompt, completion], len(images))
        prompt, (completion,) = render_split(tokenizer, prompt, completion)
    else:
        vision.check_count([prompt, completion], len(images))
    prompt_ids, features = vision.encode(prompt, images)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    trained = [int(c.completion_only_loss is False)] * len(prompt_ids) + [1] * len(completion_ids)
    return prompt_ids + completion_ids, trained, features


def attach_vision(fmt, tokenizer) -> None:
    """Give a formatter the processor side for rows with images: `_vision` (VisionRows, None for a text-only model)
    and `image_processor` (the image processor's settings, public so they enter the formatter's fingerprint)."""
    processor = processor_of(tokenizer)
    fmt._vision = VisionRows(processor) if processor is not None else None
    fmt.image_processor = processor.image_processor.to_json_string() if processor is not None else None


def answers_tokens(fmt, example: dict[str, Any], prompt, answers: list, needs: str
                   ) -> tuple[list[int], list[list[int]], dict[str, list]]:
    """(prompt ids, each answer's ids, image features) of a conversational row with images, for a formatter with
    `_vision` (attach_vision): the prompt rendered with a generation prompt and its images through the processor,
    each answer's rendered text after it encoded on its own (TRL 1.x's vision collators). The images belong to the
    prompt, whatever answer follows it."""
    from alignkit.blocks.text import check_messages, render_split

    vision, tokenizer = fmt._vision, fmt.tokenizer
    if vision is None:
        raise text_only_model(len(example[IMAGES]))
    if any(isinstance(v, str) for v in (prompt, *answers)):
        raise DataError(f"{needs} (lists of messages)")
    check_messages("prompt", prompt)
    images = vision.images(example)
    prompt = with_image_parts(prompt, len(images))
    vision.check_count([prompt, *answers], len(images))
    prompt_text, texts = render_split(tokenizer, prompt, *answers)
    prompt_ids, features = vision.encode(prompt_text, images)
    return prompt_ids, [tokenizer(a, add_special_tokens=False)["input_ids"] for a in texts], features


def check_kept(vision, kept: list[list[int]], prompt_ids: list[int], max_length: int | None) -> None:
    """Truncation must keep every image token of the prompt in each of the row's sequences (`kept`): the processor's
    image features stay whole."""
    n = vision.image_tokens(prompt_ids)
    if any(vision.image_tokens(ids) != n for ids in kept):
        raise DataError(f"the row's image tokens do not fit in method.max_length={max_length}; raise it")


def pair_tokens(fmt, example: dict[str, Any]) -> tuple[list[int], list[int], list[int], dict[str, list]]:
    """(prompt ids, chosen ids, rejected ids, image features) of a conversational preference row with images
    (answers_tokens)."""
    from alignkit.blocks.text import column

    needs = "preference rows with images need conversational 'prompt', 'chosen' and 'rejected'"
    prompt, chosen, rejected = (column(example, k, needs) for k in ("prompt", "chosen", "rejected"))
    prompt_ids, (chosen_ids, rejected_ids), features = answers_tokens(fmt, example, prompt, [chosen, rejected], needs)
    return prompt_ids, chosen_ids, rejected_ids, features

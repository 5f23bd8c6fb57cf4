"""`--image PATH` for `alignkit generate` and `chat`: the pictures a vision-language model reads with the prompt.

Through the chat template the images go into the conversation's first user turn as `{"type": "image"}` parts (TRL's
rule, as the formatters place them), with plain text (`--raw`) the processor's image token stands for each image (the
prompt may write them itself, else they come first); the processor expands them and its pixel values (and whatever
else the model reads) go to generation with the ids. The ids follow the run's formatter as for text prompts: the
rendering without special tokens, BOS first for the preference formatters (`bos_first`)."""

from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.blocks.text import render_prompt
from alignkit.blocks.tokens import with_bos
from alignkit.errors import ConfigError, DataError
from alignkit.formatters.vision import VISION_INPUTS, count_placeholders, load_image, processor_of, with_image_parts


def read_images(paths) -> list:
    """The --image files as RGB images; a one-line error naming a missing file or one Pillow cannot decode."""
    images = []
    for path in paths:
        try:
            images.append(load_image(str(Path(path).expanduser()), 0))
        except DataError as e:
            raise ConfigError(f"--image {path}: {str(e).split(': ', 1)[1]}") from None
    return images


@dataclass
class ImagePrompt:
    """A prompt's images with the processor that encodes them: `messages(conversation)` and `raw(text)` give (ids
    [1, T], image inputs) for generation."""

    tokenizer: object
    processor: object
    images: list
    bos_first: bool = False

    @classmethod
    def of(cls, images: list, tokenizer, model_dir: str, bos_first: bool = False) -> "ImagePrompt | None":
        """None without images; a one-line error when the model has no processor (a text-only model)."""
        if not images:
            return None
        processor = processor_of(tokenizer)
        if processor is None:
            raise ConfigError(f"--image: the model {model_dir} is text-only (it has no processor) and cannot read "
                              "images; give a vision-language model's folder, or leave --image out")
        return cls(tokenizer, processor, images, bos_first)

    def messages(self, messages: list[dict]) -> tuple[torch.Tensor, dict]:
        """A conversation (all-string contents) with the images before its first user turn's text."""
        return self._encode(render_prompt(self.tokenizer, with_image_parts(messages, len(self.images))), False)

    def raw(self, prompt: str) -> tuple[torch.Tensor, dict]:
        """Plain text: its image tokens, one per image, or none (then the images come first)."""
        token, n = self.processor.image_token, len(self.images)
        written = count_placeholders(prompt, token)
        if written and written != n:
            raise ConfigError(f"the prompt writes {written} image placeholder{'s' * (written != 1)} ({token!r}) and "
                              f"--image gives {n} image{'s' * (n != 1)}; write one per image, or none (the images "
                              "then come first)")
        return self._encode(prompt if written else token * n + prompt, not self.bos_first)

    def _encode(self, text: str, special: bool) -> tuple[torch.Tensor, dict]:
        out = self.processor(images=[self.images], text=[text], add_special_tokens=special, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        if self.bos_first:
            ids = with_bos(ids, self.tokenizer.bos_token_id)
        return torch.tensor([ids]), {k: out[k] for k in VISION_INPUTS if k in out}

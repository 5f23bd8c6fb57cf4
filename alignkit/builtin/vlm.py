"""The built-in tiny vision-language model, `builtin:tiny-vlm`: an Idefics3 (SmolVLM) architecture with a 2-layer
vision tower over 32x32 images (8x8 patches, 4 image tokens after the pixel shuffle) and a 2-layer Llama language
model, randomly initialised; its processor is the built-in tokenizer plus the image tokens, with a chat template that
renders `{"type": "image"}` / `{"type": "text"}` content parts. Nothing is downloaded."""

from pathlib import Path

NAME = "builtin:tiny-vlm"
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 32, 8, 2
#: the image tokens each image expands to: (32 / 8)^2 patches merged 2x2 by the pixel shuffle
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]

#: the built-in chat template with content parts: an image part renders as the processor's <image> placeholder
CHAT_TEMPLATE = (
    "{%- macro body(content) -%}{%- if content is string -%}{{ content }}{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}<image>{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ body(message['content']) }}<|end|>\n"
    "{% endgeneration %}{% else %}{{ body(message['content']) }}<|end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_vlm_processor():
    """The built-in tokenizer with the image tokens added, and an image processor that resizes every image to
    32x32 without splitting it into tiles."""
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                       max_image_size={"longest_edge": IMAGE_SIZE})
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)


def tiny_vlm_config(processor, **text_overrides):
    """The architecture of `builtin:tiny-vlm` for `processor` (about 0.3M parameters)."""
    from transformers import Idefics3Config

    tokenizer = processor.tokenizer
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    return Idefics3Config(text_config={**text, **text_overrides}, vision_config=vision, scale_factor=SCALE_FACTOR,
                          image_token_id=processor.image_token_id, tie_word_embeddings=True, pad_token_id=0)

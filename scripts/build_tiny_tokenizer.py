"""Rebuild alignkit/builtin/tokenizer/ (the byte-level BPE tokenizer of the built-in tiny model).

Run once by a maintainer; the output is committed so that every install gets the same ids:
    python scripts/build_tiny_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.blocks.demo import sort_pairs

OUT = Path(__file__).resolve().parents[1] / "alignkit" / "builtin" / "tokenizer"
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
    "Write a short poem about the sea. Explain why the sky is blue. Answer the question. Yes. No. "
    "Hello, how are you? I am fine, thank you. Please sort these numbers in ascending order."
)


def main() -> None:
    corpus = [ENGLISH] * 20
    for row in sort_pairs(3000, seed=1234):
        corpus += [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:], model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(fast)} tokens)")


if __name__ == "__main__":
    main()

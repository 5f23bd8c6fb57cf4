"""Offline stand-ins for the Hub fixtures TRL v0.15.2's ORPO tests load, built here from scratch:

- a tiny Qwen2ForCausalLM (hidden 8, 4 heads, 2 key/value heads, 2 layers, MLP 32: the sizes TRL's tiny
  models use) with a byte-level BPE tokenizer trained on the data below and a ChatML chat template;
- a tiny T5ForConditionalGeneration (d_model 16, d_kv 2, d_ff 64, 6 layers, 8 heads, decoder start 0) with a
  Unigram tokenizer (pad 0, eos 1, unk 2; eos appended to every encoding, as T5's tokenizer does);
- a `zen` preference dataset folder with four configs (standard_preference,
  standard_implicit_prompt_preference, conversational_preference,
  conversational_implicit_prompt_preference), 19 rows each split 17 train / 2 test in order, loadable
  with `datasets.load_dataset(folder, config)`. The rows are made from the Zen of Python (`import this`).

Works with transformers 4.x and 5.x (the recording venv runs TRL 0.15.2 on transformers 4.49).
Usage: python benchmarks/trl_standins.py OUT_DIR  (writes OUT_DIR/{qwen2,t5,zen})
"""

import codecs
import contextlib
import io
import json
import sys
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONFIGS = ("standard_preference", "standard_implicit_prompt_preference", "conversational_preference",
           "conversational_implicit_prompt_preference")


def zen_lines() -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the poem
        import this
    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]  # the title and blank line dropped


def preference_rows() -> dict[str, list[dict]]:
    """Each aphorism split after its first third of words: the start is the prompt, the rest the chosen
    completion; the rejected completion is the next aphorism's rest."""
    lines = zen_lines()
    cut = [max(1, len(line.split()) // 3) for line in lines]
    starts = [" ".join(line.split()[:k]) for line, k in zip(lines, cut)]
    rests = [" " + " ".join(line.split()[k:]) for line, k in zip(lines, cut)]
    other = rests[1:] + rests[:1]

    def user(i):
        return {"role": "user", "content": f"Continue: {starts[i]}"}

    def assistant(text):
        return {"role": "assistant", "content": text.strip()}

    n = range(len(lines))
    return {
        "standard_preference": [{"prompt": starts[i], "chosen": rests[i], "rejected": other[i]} for i in n],
        "standard_implicit_prompt_preference": [{"chosen": starts[i] + rests[i], "rejected": starts[i] + other[i]}
                                                for i in n],
        "conversational_preference": [{"prompt": [user(i)], "chosen": [assistant(rests[i])],
                                       "rejected": [assistant(other[i])]} for i in n],
        "conversational_implicit_prompt_preference": [{"chosen": [user(i), assistant(rests[i])],
                                                       "rejected": [user(i), assistant(other[i])]} for i in n],
    }


def build_zen(out: Path) -> Path:
    import datasets

    yaml = ["---", "configs:"]
    for name, rows in preference_rows().items():
        split = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, shuffle=False)
        yaml += [f"- config_name: {name}", "  data_files:"]
        for part in ("train", "test"):
            (out / name).mkdir(parents=True, exist_ok=True)
            split[part].to_parquet(str(out / name / f"{part}.parquet"))
            yaml += [f"  - split: {part}", f"    path: {name}/{part}.parquet"]
    (out / "README.md").write_text("\n".join([*yaml, "---", "", "Offline stand-in of a preference dataset.", ""]))
    return out


def _corpus() -> list[str]:
    rows = preference_rows()
    text = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows["standard_preference"]]
    return text + [f"{m['role']}: {m['content']}" for r in rows["conversational_implicit_prompt_preference"]
                   for m in r["chosen"] + r["rejected"]] + ["Continue: User: Assistant:"]


def build_qwen2(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=8, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_t5(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_corpus(),
                            trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                                               unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=2, d_ff=64, num_layers=6,
                                                num_heads=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                                is_encoder_decoder=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_all(out: Path) -> dict[str, Path]:
    out = Path(out)
    return {"qwen2": build_qwen2(out / "qwen2"), "t5": build_t5(out / "t5"), "zen": build_zen(out / "zen")}


if __name__ == "__main__":
    print(json.dumps({k: str(v) for k, v in build_all(Path(sys.argv[1])).items()}))

"""Hostile cases around `alignkit generate` and `chat` (issue 20): prompts built exactly as training built them,
bounded generation, and one-line errors for user mistakes."""



import pytest
from click.testing import CliRunner

import alignkit.cli.generate as gen
from alignkit.api import load_config
from alignkit.cli.commands import cli
from alignkit.config import to_yaml
from alignkit.testing import tiny_model, tiny_tokenizer

PROMPT = "sort: 5 3 9 1 ="
CHAT = [{"role": "user", "content": PROMPT}]


def model_folder(path, method: str, model: dict | None = None, **overrides):
    """A model folder as a run leaves it (weights, tokenizer, config.yaml), without training."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(**(model or {})).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    cfg, _ = load_config(method, None, overrides)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path


def fed_ids(monkeypatch, *args) -> list[int]:
    """The prompt ids `alignkit generate ARGS` hands to the model."""
    seen = []

    def capture(model, tokenizer, input_ids, sampling, emit):
        seen.append(input_ids[0].tolist())
        return ""

    monkeypatch.setattr(gen, "stream", capture)
    result = CliRunner().invoke(cli, ["generate", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def formatter_prompt_ids(method: str, row: dict) -> list[int]:
    """The prompt ids the method's own formatter trains on for `row`."""
    cfg, resolved = load_config(method)
    formatter = resolved.formatter(cfg.method, tiny_tokenizer())
    out = formatter.format(row)
    features = (out[0] if isinstance(out, list) else out).features
    if "prompt_input_ids" in features:
        return list(features["prompt_input_ids"])
    n = next(i for i, label in enumerate(features["labels"]) if label != -100)  # the masked prompt
    return list(features["input_ids"][:n])


ROWS = {  # (row with a plain-text prompt, row with a conversation) per shipped formatter kind
    "orpo": ({"prompt": PROMPT, "chosen": " 1 3 5 9", "rejected": " 9 5 3 1"},
             {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "1 3 5 9"}],
              "rejected": [{"role": "assistant", "content": "9 5 3 1"}]}),
    "sft": ({"prompt": PROMPT, "completion": " 1 3 5 9"},
            {"prompt": CHAT, "completion": [{"role": "assistant", "content": "1 3 5 9"}]}),
    "kto": ({"prompt": PROMPT, "completion": " 1 3 5 9", "label": True},
            {"prompt": CHAT, "completion": [{"role": "assistant", "content": "1 3 5 9"}], "label": True}),
    "grpo": ({"prompt": PROMPT}, {"prompt": CHAT}),
}


@pytest.mark.parametrize("method", ["orpo", "dpo", "cpo", "simpo", "sft", "kto", "grpo"])
def test_generate_feeds_the_prompt_ids_the_formatter_trains_on(tmp_path, monkeypatch, method):
    kind = {"dpo": "orpo", "cpo": "orpo", "simpo": "orpo"}.get(method, method)
    raw_row, chat_row = ROWS[kind]
    folder = str(model_folder(tmp_path / "m", method))
    assert fed_ids(monkeypatch, "--model", folder, "--raw", PROMPT) == formatter_prompt_ids(method, raw_row)
    assert fed_ids(monkeypatch, "--model", folder, "--chat-template", PROMPT) == \
        formatter_prompt_ids(method, chat_row)


def test_preference_prompts_start_with_bos_in_generate(tmp_path, monkeypatch):
    """The defect as reported: ORPO trains on BOS + prompt; generate left the BOS out."""
    folder = str(model_folder(tmp_path / "m", "orpo"))
    assert fed_ids(monkeypatch, "--model", folder, "--raw", PROMPT)[0] == tiny_tokenizer().bos_token_id


def test_generate_follows_the_training_data_by_default(tmp_path, monkeypatch):
    """The README's `alignkit generate --model outputs/orpo "sort: 5 3 9 1 ="`: the default job trains on plain-text
    prompts (builtin:sort), so the prompt goes in as plain text (BOS first), not through the chat template."""
    tok = tiny_tokenizer()
    raw = str(model_folder(tmp_path / "raw", "orpo"))
    assert fed_ids(monkeypatch, "--model", raw, PROMPT) == [tok.bos_token_id] + tok(PROMPT)["input_ids"]
    chat = str(model_folder(tmp_path / "chat", "orpo", **{"data.train": "builtin:sort-chat",
                                                           "data.eval": "builtin:sort-chat"}))
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert fed_ids(monkeypatch, "--model", chat, PROMPT) == [tok.bos_token_id] + tok(text)["input_ids"]


def chat_run(monkeypatch, folder, input, *extra):
    replies = iter(["1 3", "5 9", "x", "y"])
    monkeypatch.setattr(gen, "stream", lambda model, tokenizer, ids, sampling, emit: emit(next(replies)) or "")
    return CliRunner().invoke(cli, ["chat", "--model", folder, *extra], input=input)


def test_chat_on_a_model_trained_on_plain_text_says_so_once(tmp_path, monkeypatch):
    folder = str(model_folder(tmp_path / "raw", "orpo"))
    result = chat_run(monkeypatch, folder, "sort: 3 1 =\nsort: 9 4 =\n")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "plain text" in line]
    assert len(notes) == 1 and "not on conversations" in notes[0] and "builtin:sort" in notes[0]
    assert result.stdout.count("assistant: ") == 2
    chat = str(model_folder(tmp_path / "chat", "orpo", **{"data.train": "builtin:sort-chat",
                                                           "data.eval": "builtin:sort-chat"}))
    result = chat_run(monkeypatch, chat, "sort: 3 1 =\n")
    assert result.exit_code == 0 and "plain text" not in result.stderr


def test_generate_decodes_as_the_model_folder_says_by_default(tmp_path, monkeypatch):
    """Sampling at 0.7 by default got the README's sort wrong at some seeds: without --temperature the model's own
    generation_config.json decides (a run's model decodes greedily), as transformers' generate() does."""
    from transformers.generation.utils import GenerationMixin

    asked = []
    real = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        asked.append({k: v for k, v in kwargs.items() if k in ("do_sample", "temperature", "top_p")})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    folder = str(model_folder(tmp_path / "m", "orpo"))
    outputs = {CliRunner().invoke(cli, ["-q", "generate", "--model", folder, "--seed", str(seed), "--max-new-tokens",
                                        "6", PROMPT]).stdout for seed in range(3)}
    greedy = CliRunner().invoke(cli, ["-q", "generate", "--model", folder, "--temperature", "0", "--max-new-tokens",
                                      "6", PROMPT]).stdout
    assert asked[:3] == [{}, {}, {}] and asked[3] == {"do_sample": False}
    assert outputs == {greedy}
    CliRunner().invoke(cli, ["-q", "generate", "--model", folder, "--temperature", "0.5", "--max-new-tokens", "2",
                             PROMPT])
    assert asked[4] == {"do_sample": True, "temperature": 0.5, "top_p": 0.95}


@pytest.mark.slow
def test_the_readme_generate_example_holds_after_the_default_job(tmp_path, monkeypatch):
    """README: after `alignkit run --method orpo`, `alignkit generate --model outputs/orpo "sort: 5 3 9 1 ="` sorts
    (at the default temperature, over several seeds)."""
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["-q", "run", "--method", "orpo"]).exit_code == 0
    for seed in range(3):
        result = CliRunner().invoke(cli, ["-q", "generate", "--model", "outputs/orpo", "--seed", str(seed), PROMPT])
        assert result.exit_code == 0 and result.stdout == " 1 3 5 9\n"


def test_max_new_tokens_is_bounded_by_the_model_context(tmp_path, monkeypatch):
    """`--max-new-tokens 100000000` ran until killed: it is cut to the positions the prompt leaves, with a notice."""
    from transformers.generation.utils import GenerationMixin

    asked = []
    real = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    folder = str(model_folder(tmp_path / "m", "orpo", model={"max_position_embeddings": 40}))
    result = CliRunner().invoke(cli, ["generate", "--model", folder, "--temperature", "0", "--max-new-tokens",
                                      "100000000", PROMPT])
    assert result.exit_code == 0, result.output
    prompt_len = 1 + len(tiny_tokenizer()(PROMPT)["input_ids"])
    assert asked == [40 - prompt_len]
    notes = [line for line in result.stderr.splitlines() if "--max-new-tokens" in line]
    assert len(notes) == 1 and f"{40 - prompt_len}" in notes[0] and "40" in notes[0]
    # in a chat, once for the whole conversation
    chat = str(model_folder(tmp_path / "chat", "orpo", model={"max_position_embeddings": 60},
                            **{"data.train": "builtin:sort-chat", "data.eval": "builtin:sort-chat"}))
    result = CliRunner().invoke(cli, ["chat", "--model", chat, "--temperature", "0", "--max-new-tokens", "100000000"],
                                input="sort: 1 2 =\n/clear\nsort: 3 =\n")
    assert result.exit_code == 0 and result.stdout.count("assistant: ") == 2, result.output
    assert len([line for line in result.stderr.splitlines() if "--max-new-tokens" in line]) == 1
    # a prompt that leaves no room is one line, exit 2
    result = CliRunner().invoke(cli, ["-q", "generate", "--model", folder, " ".join(["9"] * 60)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("alignkit: error: ") and "40" in result.output


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_one_line(tmp_path, prompt):
    folder = str(model_folder(tmp_path / "m", "orpo"))
    result = CliRunner().invoke(cli, ["generate", "--model", folder, prompt])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("alignkit: error: PROMPT is empty")


@pytest.mark.parametrize("text", ["{not json", "[]", "\"builtin:tiny\"", "\udcff".encode("utf-8", "surrogatepass")])
def test_a_malformed_adapter_config_is_one_line_naming_the_file(tmp_path, text):
    folder = model_folder(tmp_path / "m", "orpo")
    (folder / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    (folder / "adapter_model.safetensors").write_bytes(b"")
    result = CliRunner().invoke(cli, ["-q", "generate", "--model", str(folder), PROMPT])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"alignkit: error: --model {folder}: {folder / 'adapter_config.json'}: ")


def test_chat_survives_input_that_is_not_utf8(tmp_path, monkeypatch):
    folder = str(model_folder(tmp_path / "chat", "orpo", **{"data.train": "builtin:sort-chat",
                                                             "data.eval": "builtin:sort-chat"}))
    result = chat_run(monkeypatch, folder, b"sort: 3 1 =\n\xff\xfe 2 =\nsort: 9 4 =\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.exception is None
    assert [line for line in result.stderr.splitlines() if "UTF-8" in line] == [
        "alignkit: that input is not valid UTF-8 text; type it again"]
    assert result.stdout.count("assistant: ") == 2

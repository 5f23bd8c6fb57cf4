"""Issue 21, capability gaps 1 and 8: a method declares its model kind (here a sequence classifier, the reward model of
tests/core/reward_head_method.py) and loading, LoRA, saving, `alignkit eval`, `generate` and the model card follow it;
the core's `model:PATH` reward scores text exactly as that reward model was trained."""

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

import alignkit
import alignkit_orpo
from alignkit.cli.commands import cli
from alignkit.online.rewards import RewardRegistry
from alignkit.testing import plugin_manager
from helpers import fast
from reward_head_method import RewardHeadPlugin


def train(tmp_path, data="sort", **model):
    pm = plugin_manager(alignkit_orpo, RewardHeadPlugin())
    config = fast(tmp_path, max_steps=12, learning_rate=3e-3)
    config["data"] = {"train": f"builtin:{data}", "max_train_samples": 64, "max_eval_samples": 16}
    config["model"] = model
    return pm, alignkit.run("reward-head", config, plugins=pm)


def eval_pairs(pm, result):
    """The run's formatted eval pairs: (prompt, chosen, rejected) texts and the chosen/rejected ids it trained on."""
    cfg, method = alignkit.load_config(None, str(result.output_dir / "config.yaml"), plugins=pm)
    from alignkit.plugins import registered_datasets

    load = registered_datasets(pm)[cfg.data.train.removeprefix("builtin:")][0]
    rows = load("test").select(range(cfg.data.max_eval_samples))
    tokenizer = alignkit.load_tokenizer(cfg.model)
    formatter = method.formatter(cfg.method, tokenizer)
    features = [formatter.format(r).features for r in rows]
    return rows, features


def scores(model, rows_ids, pad_id):
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows_ids], batch_first=True, padding_value=pad_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows_ids], batch_first=True)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def test_a_sequence_classifier_method_trains_saves_reloads_evaluates_and_is_refused_by_generate(tmp_path):
    pm, result = train(tmp_path)
    out = result.output_dir
    assert result.metrics["eval_accuracy"] > 0.5
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # the saved folder is a classifier
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == 0
    rows, features = eval_pairs(pm, result)
    chosen = scores(model, [f["chosen_input_ids"] for f in features], 0)
    rejected = scores(model, [f["rejected_input_ids"] for f in features], 0)
    assert (chosen - rejected).mean().item() == pytest.approx(result.metrics["eval_margin"], rel=1e-4)
    assert (chosen > rejected).float().mean().item() == pytest.approx(result.metrics["eval_accuracy"])
    # alignkit eval loads the folder as the method's kind: the numbers of the evaluation at the end of training
    evaluated = alignkit.evaluate(None, plugins=pm, **{"model.name_or_path": str(out),
                                                        "train.output_dir": str(tmp_path / "eval")})
    for key in ("eval_loss", "eval_accuracy", "eval_margin"):
        assert evaluated[key] == pytest.approx(result.metrics[key], rel=1e-5), key
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card
    # generate and chat refuse a model that does not generate text, in one line, exit 2
    for command in (["generate", "--model", str(out), "sort: 3 1 ="], ["chat", "--model", str(out)]):
        run = CliRunner().invoke(cli, command, input="hi\n")
        assert run.exit_code == 2, run.output
        assert run.output.strip().splitlines() == [f"alignkit: error: --model {out}: the model is "
                                                   "LlamaForSequenceClassification, which scores text and does not "
                                                   "generate it; generate and chat need a causal language model "
                                                   "(evaluate this one with alignkit eval)"]


def test_with_lora_the_classification_head_is_trained_and_saved_with_the_adapter(tmp_path):
    from peft import PeftModel

    pm, result = train(tmp_path, peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    out = result.output_dir
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        head = [k for k in f.keys() if ".score." in k or k.endswith("score.weight")]
    assert head, "the adapter holds no score head"
    cfg, _ = alignkit.load_config(None, str(out / "config.yaml"), plugins=pm)
    tokenizer = alignkit.load_tokenizer(cfg.model)
    base = alignkit.load_model(cfg.model.model_copy(update={"peft": None}), tokenizer, cfg.train.seed,
                               "sequence-classifier", 1)
    untrained_head = base.score.weight.detach().clone()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    assert not torch.equal(model.base_model.model.score.weight, untrained_head)  # the trained head came back
    rows, features = eval_pairs(pm, result)
    chosen = scores(model, [f["chosen_input_ids"] for f in features], 0)
    rejected = scores(model, [f["rejected_input_ids"] for f in features], 0)
    assert (chosen - rejected).mean().item() == pytest.approx(result.metrics["eval_margin"], rel=1e-4)
    # alignkit eval reads the adapter folder as its base of the method's kind with the adapter (and head) merged in
    evaluated = alignkit.evaluate(None, plugins=pm, **{"model.name_or_path": str(out),
                                                        "train.output_dir": str(tmp_path / "eval")})
    for key in ("eval_loss", "eval_accuracy", "eval_margin"):
        assert evaluated[key] == pytest.approx(result.metrics[key], rel=1e-4, abs=1e-6), key
    run = CliRunner().invoke(cli, ["generate", "--model", str(out), "sort: 3 1 ="])
    assert run.exit_code == 2 and "a LoRA adapter for SEQ_CLS, which scores text" in run.output, run.output


@pytest.mark.parametrize("data", ["sort", "sort-chat"])
def test_a_model_reward_scores_text_exactly_as_the_reward_model_was_trained(tmp_path, data):
    pm, result = train(tmp_path, data)
    rows, features = eval_pairs(pm, result)
    [(_, reward)] = RewardRegistry.from_plugins(pm).select([f"model:{result.output_dir}"])
    prompts = list(rows["prompt"])
    got_chosen = torch.tensor(reward(prompts, list(rows["chosen"])))
    got_rejected = torch.tensor(reward(prompts, list(rows["rejected"])))
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    want_chosen = scores(model, [f["chosen_input_ids"] for f in features], 0)
    want_rejected = scores(model, [f["rejected_input_ids"] for f in features], 0)
    torch.testing.assert_close(got_chosen, want_chosen, rtol=1e-5, atol=1e-5)  # the very ids of training
    torch.testing.assert_close(got_rejected, want_rejected, rtol=1e-5, atol=1e-5)
    accuracy = (got_chosen > got_rejected).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["eval_accuracy"])


@pytest.mark.parametrize(("kind", "labels", "message"), [
    ("value-head", 1, "model_kind 'value-head' is not one of causal-lm, sequence-classifier, token-classifier, "
                      "causal-lm-value-head"),
    ("sequence-classifier", 0, "num_labels must be a positive integer, got 0"),
])
def test_an_unknown_model_kind_or_label_count_is_refused_where_the_method_is_declared(kind, labels, message):
    from reward_head_method import RewardHeadConfig, RewardHeadLoss

    with pytest.raises(ValueError, match=f"method 'reward-head': {message}"):
        alignkit.Method(name="reward-head", config=RewardHeadConfig, formatter="preference", loss=RewardHeadLoss,
                        description="x", model_kind=kind, num_labels=labels)


def test_a_causal_lm_method_saves_a_generative_model_card_and_folder(tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=plugin_manager(alignkit_orpo))
    card = (result.output_dir / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM.from_pretrained" in card


def test_eval_reads_a_causal_lm_adapter_folder_too(tmp_path):
    pm = plugin_manager(alignkit_orpo)
    config = fast(tmp_path, max_steps=2)
    config["model"] = {"peft": {"r": 4}}
    result = alignkit.run("orpo", config, plugins=pm)
    evaluated = alignkit.evaluate(None, plugins=pm, **{"model.name_or_path": str(result.output_dir),
                                                        "train.output_dir": str(tmp_path / "eval")})
    for key in ("eval_loss", "eval_nll_loss", "eval_rewards/margins"):
        assert evaluated[key] == pytest.approx(result.metrics[key], rel=1e-4, abs=1e-6), key
    (result.output_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(alignkit.ConfigError, match="has no adapter_model.safetensors; alignkit loads safetensors only"):
        alignkit.evaluate(None, plugins=pm, **{"model.name_or_path": str(result.output_dir),
                                               "train.output_dir": str(tmp_path / "eval2")})


def test_every_declarable_model_kind_is_one_the_core_can_load():
    from alignkit.engine.modeling import KINDS
    from alignkit.plugin.method import MODEL_KINDS

    assert tuple(KINDS) == MODEL_KINDS


def train_kind(tmp_path, method, **model):
    from head_kinds_method import HeadKindsPlugin

    pm = plugin_manager(alignkit_orpo, HeadKindsPlugin())
    config = fast(tmp_path, max_steps=12, learning_rate=3e-3)
    config["data"] = {"train": "builtin:sort", "max_train_samples": 64, "max_eval_samples": 16}
    config["model"] = model
    return pm, alignkit.run(method, config, plugins=pm)


def evaluated_again(pm, folder, tmp_path):
    return alignkit.evaluate(None, plugins=pm, **{"model.name_or_path": str(folder),
                                                   "train.output_dir": str(tmp_path / "eval")})


@pytest.mark.parametrize("peft", [None, {"r": 4, "target_modules": ["q_proj", "v_proj"]}])
def test_a_token_classifier_method_saves_a_token_classifier_with_its_head(tmp_path, peft):
    """A process reward model's shape: per-token labels from AutoModelForTokenClassification."""
    from transformers import AutoModelForTokenClassification

    pm, result = train_kind(tmp_path, "token-judge", **({"peft": peft} if peft else {}))
    out = result.output_dir
    if peft:
        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            assert any("score" in k for k in f.keys()), "the adapter holds no score head"
        what = "a LoRA adapter for TOKEN_CLS"
    else:
        model = AutoModelForTokenClassification.from_pretrained(out)
        assert type(model).__name__ == "LlamaForTokenClassification" and model.config.num_labels == 2
        card = (out / "README.md").read_text()
        assert "pipeline_tag: token-classification" in card and "AutoModelForTokenClassification" in card
        assert "model kind: token-classifier (2 labels)" in card
        what = "LlamaForTokenClassification"
    evaluated = evaluated_again(pm, out, tmp_path)  # the trained head came back, with LoRA merged in
    for key in ("eval_loss", "eval_token_accuracy"):
        assert evaluated[key] == pytest.approx(result.metrics[key], rel=1e-5, abs=1e-6), key
    run = CliRunner().invoke(cli, ["generate", "--model", str(out), "sort: 3 1 ="])
    assert run.exit_code == 2 and f"the model is {what}, which scores text" in run.output, run.output


def test_a_value_head_method_saves_a_causal_lm_whose_safetensors_hold_the_trained_head(tmp_path):
    from head_kinds_method import values_at_last_token
    from transformers import AutoModelForCausalLM

    pm, result = train_kind(tmp_path, "value-fit")
    out = result.output_dir
    with safe_open(out / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if k.startswith("v_head.")}
    assert sorted(saved) == ["v_head.summary.bias", "v_head.summary.weight"]  # TRL's value-head layout
    assert AutoModelForCausalLM.from_pretrained(out).config.architectures == ["LlamaForCausalLM"]
    cfg, _ = alignkit.load_config(None, str(out / "config.yaml"), plugins=pm)
    tokenizer = alignkit.load_tokenizer(cfg.model)
    fresh = alignkit.load_model(cfg.model, tokenizer, cfg.train.seed, "causal-lm-value-head")
    reloaded = alignkit.load_model(cfg.model.model_copy(update={"name_or_path": str(out)}), tokenizer, 0,
                                   "causal-lm-value-head").eval()
    torch.testing.assert_close(reloaded.v_head.summary.weight, saved["v_head.summary.weight"])
    assert not torch.equal(fresh.v_head.summary.weight, saved["v_head.summary.weight"])  # it trained
    _, features = eval_pairs(pm, result)
    rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
    with torch.no_grad():
        values = values_at_last_token(reloaded, ids, mask)
    assert values.mean().item() == pytest.approx(result.metrics["eval_value"], rel=1e-4)
    evaluated = evaluated_again(pm, out, tmp_path)
    for key in ("eval_loss", "eval_value", "eval_value_accuracy"):
        assert evaluated[key] == pytest.approx(result.metrics[key], rel=1e-5), key
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "v_head.summary" in card
    run = CliRunner().invoke(cli, ["generate", "--model", str(out), "--max-new-tokens", "4", "sort: 3 1 ="])
    assert run.exit_code == 0, run.output  # it is still a language model


def test_with_lora_a_value_head_is_trained_in_full_and_saved_with_the_adapter(tmp_path):
    pm, result = train_kind(tmp_path, "value-fit", peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    out = result.output_dir
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        head = [k for k in f.keys() if "v_head" in k]
    assert sorted(head) == ["base_model.model.v_head.summary.bias", "base_model.model.v_head.summary.weight"]
    evaluated = evaluated_again(pm, out, tmp_path)  # the adapter and its head merged into the base
    for key in ("eval_loss", "eval_value", "eval_value_accuracy"):
        assert evaluated[key] == pytest.approx(result.metrics[key], rel=1e-4, abs=1e-6), key


def test_a_saved_value_head_that_does_not_fit_the_model_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    pm, result = train_kind(tmp_path, "value-fit")
    out = result.output_dir
    weights = load_file(out / "model.safetensors")
    weights["v_head.summary.weight"] = torch.zeros(1, 7)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(alignkit.ConfigError, match=f"model.name_or_path: {out}: its saved value head does not fit"):
        evaluated_again(pm, out, tmp_path)

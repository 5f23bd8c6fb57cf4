"""`from alignkit_orpo import ORPOConfig, ORPOTrainer`: TRL v0.15.2's surface on alignkit's engine."""

import json
import subprocess
import sys
import warnings

import datasets
import pytest
import torch
from transformers import TrainerCallback

import alignkit
from alignkit.testing import tiny_model
from alignkit_orpo import ORPOConfig, ORPOTrainer, odds_ratio_terms
from alignkit_orpo.demo import sort_pairs

ROWS = sort_pairs(12, seed=2)


@pytest.fixture
def dataset():
    return datasets.Dataset.from_list(ROWS)


def trainer(tok, tmp_path, dataset, **args):
    args = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
            "report_to": "none", "disable_tqdm": True, "max_steps": 3, "learning_rate": 1e-3, **args}
    return ORPOTrainer(model=tiny_model(seed=1), args=ORPOConfig(**args), processing_class=tok,
                       train_dataset=dataset, eval_dataset=dataset)


QUICK_START = '''
# train_orpo.py
from datasets import load_dataset
from alignkit_orpo import ORPOConfig, ORPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model}")
tokenizer = AutoTokenizer.from_pretrained("{model}")
train_dataset = load_dataset("json", data_files="{data}", split="train")

training_args = ORPOConfig(output_dir="{out}", logging_steps=10)
trainer = ORPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
trainer.train()
'''


def test_seed_quick_start_runs_with_only_the_import_changed(tok, tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sort_pairs(24, seed=1)))
    script = tmp_path / "train_orpo.py"
    script.write_text(QUICK_START.format(model=tmp_path / "model", data=tmp_path / "data.jsonl", out=tmp_path / "Qwen2-0.5B-ORPO"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "Qwen2-0.5B-ORPO"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 9  # 24 pairs / 8 per step x 3 epochs, the seed's defaults
    assert rows[-1]["learning_rate"] == 0.0 and (out / "model.safetensors").is_file()


def test_evaluate_equals_the_alignkit_api(tok, tmp_path, dataset):
    t = trainer(tok, tmp_path, dataset)
    got = t.evaluate()
    expected = alignkit.evaluate("orpo", model=tiny_model(seed=1), tokenizer=tok, eval_dataset=dataset,
                                 **{"train.per_device_eval_batch_size": 4, "train.output_dir": str(tmp_path / "e")})
    assert got == pytest.approx(expected, rel=1e-6)
    assert "eval_rewards/accuracies" in got and "eval_log_odds_chosen" in got
    assert set(t.evaluate(metric_key_prefix="test")) == {k.replace("eval_", "test_") for k in expected}


def test_train_returns_train_output_and_callbacks_fire(tok, tmp_path, dataset):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.events = []

        def on_train_begin(self, args, state, control, **kw):
            self.events.append("begin")

        def on_step_end(self, args, state, control, **kw):
            self.events.append(f"step{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kw):
            self.events.append(f"log:{sorted(logs)[0]}")

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.events.append(f"eval:{'eval_loss' in metrics}")

        def on_save(self, args, state, control, **kw):
            self.events.append("save")

    rec = Recorder()
    t = ORPOTrainer(model=tiny_model(), processing_class=tok, train_dataset=dataset, eval_dataset=dataset,
                    callbacks=[rec], args=ORPOConfig(output_dir=str(tmp_path), max_steps=3, logging_steps=2,
                                                     save_steps=2, eval_strategy="steps", eval_steps=2,
                                                     per_device_train_batch_size=4, disable_tqdm=True))
    out = t.train()
    assert out.global_step == 3 and out.training_loss == out.metrics["loss"]
    assert rec.events == ["begin", "step1", "step2", "log:grad_norm", "eval:True", "save", "step3",
                          "log:grad_norm", "eval:True"]


def test_seed_methods(tok, tmp_path, dataset):
    t = trainer(tok, tmp_path, dataset)
    row = ROWS[0]
    answer = t.build_tokenized_answer(row["prompt"], row["chosen"])
    assert answer["prompt_input_ids"] + answer["input_ids"] == tok(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
    tokenized = t.tokenize_row(row)
    assert tokenized["chosen_input_ids"][0] == tok.bos_token_id and tokenized["chosen_input_ids"][-1] == tok.eos_token_id
    assert tokenized["chosen_labels"][: len(tokenized["prompt_input_ids"])] == [-100] * len(tokenized["prompt_input_ids"])

    rows = [t.tokenize_row(r) for r in ROWS[:2]]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    cat = t.concatenated_inputs(batch, label_pad_token_id=-100, padding_value=0)
    assert cat["concatenated_input_ids"].shape[0] == 4
    assert cat["concatenated_input_ids"][0, : len(rows[0]["chosen_input_ids"])].tolist() == rows[0]["chosen_input_ids"]

    chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll = t.concatenated_forward(t.model, batch)
    width = cat["concatenated_input_ids"].shape[1]
    assert chosen_logits.shape[:2] == (2, width - 1)  # TRL slices off the last position of decoder-only rows
    logits = t.model(input_ids=cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"]).logits
    assert torch.allclose(t.get_batch_logps(logits, cat["concatenated_labels"], average_log_prob=True),
                          torch.cat([chosen_logps, rejected_logps]))
    summed = t.get_batch_logps(logits, cat["concatenated_labels"])
    lengths = (cat["concatenated_labels"][:, 1:] != -100).sum(-1)
    assert torch.allclose(summed / lengths, torch.cat([chosen_logps, rejected_logps]))

    losses, chosen_rewards, rejected_rewards, ratio, log_odds = t.odds_ratio_loss(chosen_logps, rejected_logps)
    expected_losses, expected_odds, expected_sigma = odds_ratio_terms(chosen_logps, rejected_logps, 0.1)
    assert torch.allclose(losses, expected_losses) and torch.allclose(log_odds, expected_odds.mean())
    assert torch.allclose(chosen_rewards, 0.1 * chosen_logps) and torch.allclose(ratio, expected_sigma.mean())

    loss, metrics = t.get_batch_loss_metrics(t.model, batch, train_eval="eval")
    assert loss.item() == pytest.approx(nll.item() + losses.mean().item(), rel=1e-5)
    assert metrics["eval_nll_loss"] == pytest.approx(nll.item(), rel=1e-6)

    completions = t.generate_from_model(t.model, batch)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    t.log({"custom": 1.0})
    t.create_model_card(model_name="my-orpo", dataset_name="me/pairs", tags=["extra"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# my-orpo" in card and "- me/pairs" in card and "- extra" in card and "2403.07691" in card


def test_compute_metrics_works_in_eval(tok, tmp_path, dataset):
    seen = {}

    def compute_metrics(pred):
        seen["shape"] = pred.predictions.shape
        return {"chosen_wins": float((pred.predictions[:, 0] > pred.predictions[:, 1]).mean())}

    t = ORPOTrainer(model=tiny_model(seed=1), processing_class=tok, eval_dataset=dataset, compute_metrics=compute_metrics,
                    args=ORPOConfig(output_dir=str(tmp_path), per_device_eval_batch_size=4))
    metrics = t.evaluate()
    assert seen["shape"] == (12, 2)
    assert metrics["eval_chosen_wins"] == pytest.approx(metrics["eval_rewards/accuracies"], abs=1e-6)

    t.preprocess_logits_for_metrics = lambda logits, labels: logits.mean(-1)[:, :1]  # [2B, 1] per batch
    t.compute_metrics = lambda pred: {"rows": float(pred.predictions.shape[0])}
    assert t.evaluate()["eval_rows"] == 24.0


def test_custom_optimizer_collator_and_model_init(tok, tmp_path, dataset):
    model = tiny_model(seed=4)
    steps = []

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    optimizer = CountingSGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    collated = []

    def trl_style_collator(features):  # pads TRL's per-side keys, as DPODataCollatorWithPadding does
        collated.append(sorted(features[0]))
        out = {}
        for key in features[0]:
            pad = -100 if key.endswith("labels") else 0
            width = max(len(f[key]) for f in features)
            out[key] = torch.tensor([f[key] + [pad] * (width - len(f[key])) for f in features])
        return out

    t = ORPOTrainer(model=model, processing_class=tok, train_dataset=dataset, optimizers=(optimizer, scheduler),
                    data_collator=trl_style_collator,
                    args=ORPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t.train()
    assert len(steps) == 2 and len(collated) >= 2  # accelerate fetches one batch ahead
    assert collated[0] == ["chosen_attention_mask", "chosen_input_ids", "chosen_labels", "prompt_attention_mask",
                           "prompt_input_ids", "rejected_attention_mask", "rejected_input_ids", "rejected_labels"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # lr 0: nothing moved
    t2 = ORPOTrainer(model_init=lambda: tiny_model(seed=5), processing_class=tok, eval_dataset=dataset,
                     args=ORPOConfig(output_dir=str(tmp_path / "b")))
    assert "eval_loss" in t2.evaluate()
    tiny_model(seed=5).save_pretrained(tmp_path / "named")
    tok.save_pretrained(tmp_path / "named")
    t3 = ORPOTrainer(model=str(tmp_path / "named"), eval_dataset=dataset, args=ORPOConfig(output_dir=str(tmp_path / "c")))
    assert t3.evaluate()["eval_loss"] == pytest.approx(t2.evaluate()["eval_loss"], rel=1e-6)


def test_config_fields_mapped_ignored_or_rejected(tok, tmp_path, dataset):
    assert ORPOConfig().learning_rate == 1e-6 and ORPOConfig().beta == 0.1 and ORPOConfig().max_length == 1024
    mapped = ORPOConfig(output_dir="o", beta=0.3, warmup_ratio=0.1, truncation_mode="keep_start").to_alignkit()
    assert mapped["method.beta"] == 0.3 and mapped["train.warmup_ratio"] == 0.1
    assert mapped["method.truncation_mode"] == "keep_start"
    lean = ORPOConfig(output_dir="o", group_by_length=True, use_liger_kernel=True).to_alignkit()
    assert lean["train.group_by_length"] is True and lean["method.loss_implementation"] == "chunked"
    with pytest.warns(UserWarning, match="ORPOConfig.push_to_hub=True is ignored"):
        ORPOConfig(output_dir="o", push_to_hub=True).to_alignkit()
    with pytest.raises(ValueError, match="ORPOConfig.neftune_noise_alpha=5 is not supported by alignkit and would change"):
        ORPOConfig(output_dir="o", neftune_noise_alpha=5).to_alignkit()
    with pytest.raises(ValueError, match="optim='adafactor'.*AdamW"):
        ORPOConfig(output_dir="o", optim="adafactor").to_alignkit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ORPOConfig(output_dir="o", optim="adamw_torch_fused").to_alignkit()
    with pytest.raises(alignkit.ConfigError, match="max_prompt_length"):
        trainer(tok, tmp_path, dataset, max_prompt_length=2048)


def test_peft_config_trains_adapters_that_peft_loads(tok, tmp_path, dataset):
    from peft import LoraConfig, PeftModel

    t = ORPOTrainer(model=tiny_model(seed=6), processing_class=tok, train_dataset=dataset,
                    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                    args=ORPOConfig(output_dir=str(tmp_path / "lora"), max_steps=2, learning_rate=1e-2,
                                    per_device_train_batch_size=4))
    t.train()
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(tiny_model(seed=6), tmp_path / "lora").eval()
    ids = torch.tensor([tok("sort: 3 1 =", add_special_tokens=False)["input_ids"]])
    t.model.eval()
    assert torch.allclose(loaded(ids).logits, t.model(ids).logits, atol=1e-5)

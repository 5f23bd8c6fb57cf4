"""Encoder-decoder models (a tiny random T5): prompt to the encoder, answers as decoder labels."""

import copy

import datasets
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

import alignkit
from alignkit.blocks.demo import sort_pairs
from alignkit_orpo import ORPOConfig, ORPOTrainer
from helpers import fast

ROWS = sort_pairs(6, seed=8)
ROWS[0]["prompt"] = "sort: " + " ".join(["4"] * 20) + " ="  # longer than max_prompt_length below
ROWS[1]["chosen"] = " " + " ".join(["1"] * 20)  # longer than max_completion_length below


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=2))


def reference(model, tok, rows, batch_size, beta, max_prompt, max_completion):
    """TRL v0.15.2's encoder-decoder ORPO, written out in float64."""
    model = copy.deepcopy(model).double().eval()
    enc = lambda text, cap: tok(text, truncation=True, max_length=cap,  # noqa: E731
                                add_special_tokens=True)["input_ids"]
    per_batch = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        n = len(chunk)
        prompts = [enc(r["prompt"], max_prompt) for r in chunk] * 2
        answers = [enc(r["chosen"], max_completion) for r in chunk] + [enc(r["rejected"], max_completion)
                                                                       for r in chunk]
        P, L = max(map(len, prompts)), max(map(len, answers))
        ids = torch.tensor([p + [0] * (P - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (P - len(p)) for p in prompts])
        labels = torch.tensor([a + [-100] * (L - len(a)) for a in answers])
        decoder = torch.tensor([[0] + [t if t != -100 else 0 for t in row[:-1]] for row in labels.tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        logp = torch.log_softmax(logits, -1)
        token = [[logp[i, t, labels[i, t]] for t in range(L) if labels[i, t] != -100] for i in range(2 * n)]
        nll = -sum(sum(row) for row in token[:n]) / sum(len(row) for row in token[:n])
        means = torch.stack([sum(row) / len(row) for row in token])
        lc, lr = means[:n], means[n:]
        log_odds = (lc - lr) - (torch.log(-torch.expm1(lc)) - torch.log(-torch.expm1(lr)))
        log_sig = torch.nn.functional.logsigmoid(log_odds)
        per_batch.append({"loss": nll - (beta * log_sig).mean(), "nll_loss": nll, "logps/chosen": lc.mean(),
                          "logps/rejected": lr.mean(), "rewards/margins": beta * (lc - lr).mean(),
                          "log_odds_chosen": log_odds.mean(), "log_odds_ratio": log_sig.mean(),
                          "logits/chosen": logits[:n].mean(), "logits/rejected": logits[n:].mean()})
    return {f"eval_{k}": float(sum(b[k] for b in per_batch) / len(per_batch)) for k in per_batch[0]}


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_seq2seq_eval_equals_reference(tok, pm, tmp_path, dtype, rel):
    model = tiny_t5().to(dtype)
    expected = reference(model, tok, ROWS, batch_size=4, beta=0.1, max_prompt=12, max_completion=8)
    got = alignkit.evaluate("orpo", plugins=pm, model=model, tokenizer=tok,
                            eval_dataset=datasets.Dataset.from_list(ROWS),
                            **{"method.max_prompt_length": 12, "method.max_completion_length": 8,
                               "train.per_device_eval_batch_size": 4, "train.output_dir": str(tmp_path)})
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=rel / 10), key


def test_seq2seq_trains_and_saves(tok, pm, tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=4, learning_rate=3e-3), plugins=pm, model=tiny_t5(),
                          **{"method.max_completion_length": 16})
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(result.output_dir)
    assert reloaded.config.is_encoder_decoder


def test_trl_trainer_with_seq2seq(tok, tmp_path):
    t = ORPOTrainer(model=tiny_t5(), processing_class=tok, eval_dataset=datasets.Dataset.from_list(ROWS),
                    args=ORPOConfig(output_dir=str(tmp_path), per_device_eval_batch_size=4, max_completion_length=8,
                                    max_prompt_length=12))
    assert t.is_encoder_decoder
    metrics = t.evaluate()
    assert set(metrics) >= {"eval_loss", "eval_rewards/accuracies", "eval_logits/chosen"}
    row = t.tokenize_row(ROWS[2])
    assert set(row) == {"prompt_input_ids", "prompt_attention_mask", "chosen_labels", "rejected_labels"}
    assert row["chosen_labels"] == tok(ROWS[2]["chosen"], add_special_tokens=True)["input_ids"]

"""generate_during_eval: sample completions for a few eval prompts at each evaluation."""

import json
import logging

import torch

from alignkit import hookimpl

log = logging.getLogger(__name__)
N_PROMPTS = 4


def sample_completions(model, tokenizer, prompts: list[list[int]], max_length: int) -> list[str]:
    """Sample one completion per prompt (left-padded batch), decoded without the prompt.

    Runs under a forked RNG so that turning generation on does not change the training run.
    """
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             max_length=max(max_length, width + 1), pad_token_id=pad)
    model.train(was_training)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


@hookimpl
def on_evaluate(run, step, metrics):
    """Write (step, prompt, completion) rows for the first eval prompts when the run asks for them.

    A lifecycle hook of this plugin: it runs only for runs of ORPO (the method this plugin registers)."""
    if not getattr(run.config.method, "generate_during_eval", False) or run.eval_dataset is None:
        return
    if "prompt_input_ids" not in run.eval_dataset.column_names:
        log.warning("method.generate_during_eval: the eval data has no prompt_input_ids (not formatted by the "
                    "preference formatter); no completions sampled")
        return
    if not run.is_main_process:
        return
    rows = [list(run.eval_dataset[i]["prompt_input_ids"]) for i in range(min(N_PROMPTS, len(run.eval_dataset)))]
    completions = sample_completions(run.model, run.tokenizer, rows, run.config.method.max_length)
    prompts = run.tokenizer.batch_decode(rows, skip_special_tokens=True)
    table = [[step, p, c] for p, c in zip(prompts, completions)]
    with (run.output_dir / "completions.jsonl").open("a") as f:
        for s, p, c in table:
            f.write(json.dumps({"step": s, "prompt": p, "completion": c}) + "\n")
    run.log_table("completions", ["step", "prompt", "completion"], table)

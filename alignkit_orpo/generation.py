"""generate_during_eval: sample completions for a few eval prompts at each evaluation."""

import json
import logging

import torch

from alignkit import hookimpl
from alignkit.formatters.vision import VisionRows, processor_of

log = logging.getLogger(__name__)
N_PROMPTS = 4


def sample_completions(model, tokenizer, prompts: list[list[int]], max_length: int, images: dict | None = None
                       ) -> list[str]:
    """Sample one completion per prompt (left-padded batch), decoded without the prompt; `images`: the prompts'
    image inputs (a vision-language model's pixel values, alignkit.formatters.vision).

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
                             max_length=max(max_length, width + 1), pad_token_id=pad,
                             **{k: v.to(device) for k, v in (images or {}).items()})
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
    features = [run.eval_dataset[i] for i in range(min(N_PROMPTS, len(run.eval_dataset)))]
    rows = [list(f["prompt_input_ids"]) for f in features]
    processor = processor_of(run.tokenizer)  # a vision-language model's: each prompt's images go with it
    completions = sample_completions(run.model, run.tokenizer, rows, run.config.method.max_length,
                                     VisionRows(processor).collate(features) if processor is not None else None)
    prompts = run.tokenizer.batch_decode(rows, skip_special_tokens=True)
    table = [[step, p, c] for p, c in zip(prompts, completions)]
    with (run.output_dir / "completions.jsonl").open("a") as f:
        for s, p, c in table:
            f.write(json.dumps({"step": s, "prompt": p, "completion": c}) + "\n")
    run.log_table("completions", ["step", "prompt", "completion"], table)

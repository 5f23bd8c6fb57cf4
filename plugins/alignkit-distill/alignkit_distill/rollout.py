"""Which completions a training step distils on (TRL's GKD training_step): with probability `lmbda` the student's
own samples (on-policy), else, with `seq_kd`, the teacher's samples, else the data's completions. Evaluation
scores the data's completions, so the held-out divergence is measured on fixed rows; eval rows that are prompts alone
are scored on the student's samples, as TRL's DistillationTrainer evaluates.

The choice is drawn once per optimizer step from (the run's seed, the step), and sampling goes through the core's
generation handle (each completion's randomness fixed by the prompt and the step), so a resumed run and a run on
more processes train on exactly the same completions."""

import random

from alignkit.blocks.tokens import pad_right
from alignkit.online.generation import mix_seed
from alignkit_distill.config import DistillConfig


def source(config: DistillConfig, seed: int, step: int) -> str:
    """'student', 'teacher' or 'data': the completions of training step `step`."""
    if random.Random(mix_seed("distill-lmbda", seed, step)).random() < config.lmbda:
        return "student"
    return "teacher" if config.seq_kd else "data"


class DistillRollout:
    """Built once per run as `DistillRollout(config, tokenizer)`; batches are the sequence formatter's."""

    def __init__(self, config: DistillConfig, tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer

    def __call__(self, batch: dict, ctx) -> dict:
        ignore, tok = self.config.label_pad_token_id, self.tokenizer
        if not ctx.training:  # the data's completions; prompts alone: the student's (TRL's DistillationTrainer)
            if (batch["labels"][:, 1:] != ignore).any():
                return batch
            which = "student"
        else:
            which = source(self.config, ctx.generator.seed, ctx.step)
        if which == "data":
            return batch
        prompts = []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            trained = (labels[1:] != ignore).nonzero()
            end = int(trained[0]) + 1 if len(trained) else int(mask.sum())
            prompts.append(ids[:end].tolist())
        groups = ctx.generator.generate(prompts, n=1, max_new_tokens=self.config.max_new_tokens,
                                        temperature=self.config.temperature, top_p=1.0, top_k=0,
                                        stop_token_ids=[tok.eos_token_id], seed=mix_seed("distill", ctx.step),
                                        model="policy" if which == "student" else "reference")
        completions = [g[0] for g in groups]
        rows = [p + c for p, c in zip(prompts, completions)]
        out = {"input_ids": pad_right(rows, tok.pad_token_id),
               "attention_mask": pad_right([[1] * len(r) for r in rows], 0),
               "labels": pad_right([[ignore] * len(p) + c for p, c in zip(prompts, completions)], ignore)}
        return {k: v.to(ctx.device) for k, v in out.items()}

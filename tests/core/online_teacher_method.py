"""A small online method for tests/core/test_online_capabilities.py (importable as `online_teacher_method`): its rollout
samples the reference model (a teacher, `model.ref_name_or_path`) greedily through the engine's generation handle,
as TRL's seq_kd does, and its loss is the policy's NLL of the teacher's completions."""

import torch
import torch.nn.functional as F

import alignkit
from alignkit.blocks.tokens import pad_right


class TeacherConfig(alignkit.MethodConfig):
    name: str = "teacher-kd"
    max_completion_length: int = 6
    use_for_model: bool = False


class TeacherRollout:
    """Greedy completions from the reference model; records every one in `sampled` (class-wide)."""

    sampled: list = []

    def __init__(self, config: TeacherConfig, tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer

    def __call__(self, batch: dict, ctx) -> dict:
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        kwargs = {"n": 1, "max_new_tokens": self.config.max_completion_length, "temperature": 0.0}
        if self.config.use_for_model:
            groups = ctx.generator.for_model("reference").generate(prompts, **kwargs)
        else:
            groups = ctx.generator.generate(prompts, model="reference", **kwargs)
        rows = [p + g[0] for p, g in zip(prompts, groups)]
        TeacherRollout.sampled += [(p, g[0]) for p, g in zip(prompts, groups)]
        labels = [[-100] * len(p) + g[0] for p, g in zip(prompts, groups)]
        ids = pad_right(rows, self.tokenizer.pad_token_id)
        mask = pad_right([[1] * len(r) for r in rows], 0)
        return {k: v.to(ctx.device) for k, v in
                {"input_ids": ids, "attention_mask": mask, "labels": pad_right(labels, -100)}.items()}


class TeacherLoss(alignkit.Loss):
    needs_reference_model = True

    def counts(self, batch):
        return {"tokens": int((batch["labels"][:, 1:] != -100).sum())}

    def __call__(self, model, batch, **kwargs):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                              reduction="sum")
        return alignkit.LossOutput(terms={"tokens": nll})

    def reference(self, ref_model, batch):
        return {"unused": torch.zeros(batch["input_ids"].shape[0])}


METHOD = alignkit.Method(name="teacher-kd", config=TeacherConfig, formatter="prompt-only", loss=TeacherLoss,
                         rollout=TeacherRollout, description="Test method: the policy learns the teacher's samples.")


@alignkit.hookimpl
def register_methods(register):
    register(METHOD)

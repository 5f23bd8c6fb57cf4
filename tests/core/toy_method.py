"""A small method plugin for the core's tests (importable as `toy_method`): prompt-completion rows, a
per-token NLL loss that reports exact (sum, count) metrics and reads the StepContext, its own demo data,
and a config field `generate_during_eval` that ORPO's config has too (hook scoping)."""

import torch
import torch.nn.functional as F
from pydantic import Field

import alignkit
from alignkit.blocks import demo
from alignkit.blocks.tokens import pad_right


class ToyConfig(alignkit.MethodConfig):
    name: str = "toy"
    generate_during_eval: bool = Field(False, description="Same name as ORPO's field; this method ignores it.")
    eval_loss_per_batch: bool = Field(False, description="Use the mean of per-batch losses for eval_loss.")


class ToyFormatter(alignkit.DataFormatter):
    """prompt + completion -> input_ids, labels (the prompt masked). A list of completions makes one
    example per completion."""

    def format(self, row):
        if not isinstance(row.get("prompt"), str):
            raise alignkit.DataError("'prompt' must be a string")
        completions = row["completion"]
        many = isinstance(completions, list)
        if many and not completions:
            raise alignkit.DropExample  # (an empty list would mean: another row carries this one, as in packing)
        out = []
        for completion in completions if many else [completions]:
            prompt = self.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(alignkit.Formatted({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}))
        return out if many else out[0]

    def collate(self, features):
        ids = pad_right([f["input_ids"] for f in features], self.tokenizer.pad_token_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": pad_right([f["labels"] for f in features], -100)}


class ToyLoss(alignkit.Loss):
    """Summed NLL over the labelled tokens, normalised per token. Records every StepContext it gets."""

    seen: list | None = None  # set to a list to record (stage, ctx) for every call, across instances

    @property
    def eval_loss_per_batch(self):
        return self.config.eval_loss_per_batch

    def counts(self, batch, ctx):
        if ToyLoss.seen is not None:
            ToyLoss.seen.append(("counts", ctx))
        return {"tokens": int((batch["labels"][:, 1:] != -100).sum())}

    def __call__(self, model, batch, ctx):
        if ToyLoss.seen is not None:
            ToyLoss.seen.append(("loss", ctx))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        n = (labels != -100).sum()
        right = ((logits.argmax(-1) == labels) & (labels != -100)).sum()
        metrics = {"token_nll": (nll.detach(), n), "accuracy": (right, n), "plain_nll": nll.detach() / n}
        if ctx.training and ctx.micro_batch == 0:  # a probe present on some micro-batches only
            metrics["probe"] = (torch.tensor(1.0), 1)
            metrics["probe_plain"] = torch.tensor(1.0)
        return alignkit.LossOutput(terms={"tokens": nll}, metrics=metrics)


def toy_rows(split: str) -> list[dict]:
    return [{"prompt": demo.prompt(d), "completion": " " + demo.words(sorted(d))} for d in demo.split_lists(split)]


DEMO_DEFAULTS = {"train.learning_rate": 2e-3, "train.per_device_eval_batch_size": 25}


class ToyPlugin:
    """The plugin: the `toy` method, its `toy-sort` demo data, and an on_evaluate recorder (scoped to toy)."""

    def __init__(self, all_runs: bool = False, demo_data: str | None = "toy-sort", loss: type = ToyLoss) -> None:
        self.evaluations: list[tuple[str, dict]] = []
        self.demo_data, self.loss = demo_data, loss
        if all_runs:
            self.alignkit_all_runs = True

    @alignkit.hookimpl
    def register_methods(self, register):
        register(alignkit.Method(name="toy", config=ToyConfig, formatter=ToyFormatter, loss=self.loss,
                                 description="Per-token NLL on completions (tests).", demo_data=self.demo_data,
                                 demo_defaults=DEMO_DEFAULTS, progress_metrics=("accuracy",)))

    @alignkit.hookimpl
    def register_datasets(self, register):
        import datasets

        register("toy-sort", lambda split: datasets.Dataset.from_list(toy_rows(split)))

    @alignkit.hookimpl
    def on_evaluate(self, run, step, metrics):
        self.evaluations.append((run.method.name, dict(metrics)))

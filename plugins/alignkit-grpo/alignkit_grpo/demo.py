"""The built-in demo: prompts to sort digits (`builtin:sort-prompts`, answer column = the sorted list), and a few
seconds of supervised warm-up on its train split so that RL starts from a model that sometimes gets it right."""

import logging
import time

import datasets
import torch

from alignkit.blocks import demo

log = logging.getLogger(__name__)


def rows(split: str) -> list[dict[str, str]]:
    """`prompt` ("sort: 3 1 2 =") and `answer` (" 1 2 3") for the lists of `split` (alignkit.blocks.demo)."""
    return [{"prompt": demo.prompt(d), "answer": " " + demo.words(sorted(d))} for d in demo.split_lists(split)]


def load(split: str) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows(split))


def sft_warmup(model, tokenizer, steps: int, lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> None:
    """`steps` of next-token training on prompt + answer + EOS (loss on the answer only), in place."""
    start = time.time()
    g = torch.Generator().manual_seed(seed)
    data = rows("train")
    encoded = []
    for r in data:
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p + a, [-100] * len(p) + a))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    was_training = model.training
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.tensor([encoded[i][0] + [tokenizer.pad_token_id] * (width - len(encoded[i][0])) for i in idx])
        labels = torch.tensor([encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in idx])
        mask = (ids != tokenizer.pad_token_id).long()
        loss = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                     labels=labels.to(model.device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    log.info("demo warm-up: %d supervised steps in %.1fs (last loss %.3f)", steps, time.time() - start, loss.item())

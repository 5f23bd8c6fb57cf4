"""The built-in demo: prompts to sort digits (`builtin:sort-prompts`, answer column = the sorted list), and a few
seconds of supervised warm-up on its train split so that RL starts from a model that sometimes gets it right."""

import logging
import random
import time

import datasets
import torch

log = logging.getLogger(__name__)
N_TRAIN, N_TEST = 2000, 200


def _lists(n: int, seed: int = 0) -> list[list[int]]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(3, 6)))
        if digits not in seen and len(set(digits)) > 1:
            seen.add(digits)
            out.append(list(digits))
    return out


def rows(split: str) -> list[dict[str, str]]:
    lists = _lists(N_TRAIN + N_TEST)
    lists = lists[:N_TRAIN] if split == "train" else lists[N_TRAIN:]
    return [{"prompt": f"sort: {' '.join(map(str, d))} =", "answer": " " + " ".join(map(str, sorted(d)))}
            for d in lists]


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

"""A neutral generator for plugins' built-in demo data: lists of digits to sort.

Every shipped method's demo teaches the tiny built-in model the same task (sort a few digits), in the
data shape that method trains on; a plugin builds its rows from these lists and registers them with the
`register_datasets` hook. Train and test lists never overlap.
"""

import logging
import random
import time

log = logging.getLogger(__name__)

#: lists in the train split and the test split (the test lists follow the train lists in one stream)
N_TRAIN, N_TEST = 2000, 200

#: the training settings every demo shares (tiny built-in model on built-in data: a run of seconds that logs,
#: evaluates from step 0 and keeps two checkpoints)
DEMO_TRAIN = {
    "train.per_device_train_batch_size": 16, "train.per_device_eval_batch_size": 50, "train.warmup_ratio": 0.05,
    "train.logging_steps": 10, "train.eval_steps": 50, "train.save_steps": 100, "train.save_total_limit": 2,
    "train.eval_on_start": True,
}


def demo_defaults(learning_rate: float = 3e-3, num_train_epochs: int | None = 1, **settings) -> dict:
    """A method's `Method.demo_defaults`: DEMO_TRAIN with its learning rate and epochs (None: no epochs key, e.g.
    for `train.max_steps`), then `settings`, dotted keys (`**{"method.beta": 0.5}`) that add or replace."""
    wrong = [key for key in settings if "." not in key]
    if wrong:
        raise ValueError(f"demo_defaults: {', '.join(wrong)} is not a dotted key (e.g. 'train.eval_steps')")
    out = {**DEMO_TRAIN, "train.learning_rate": learning_rate, "train.num_train_epochs": num_train_epochs}
    out.update(settings)
    return {key: value for key, value in out.items() if not (key == "train.num_train_epochs" and value is None)}


def online_demo_defaults(**settings) -> dict:
    """`Method.demo_defaults` of an online method's demo on `builtin:sort-prompts`: 150 supervised warm-up steps, then
    120 RL steps of 16 prompts x 8 completions of up to 14 tokens at learning rate 3e-4, evaluated every 40 steps on
    64 held-out prompts; `settings` (dotted keys, e.g. the rewards) add or replace."""
    return demo_defaults(3e-4, None, **{
        "method.sft_warmup_steps": 150, "method.num_generations": 8, "method.max_completion_length": 14,
        "train.per_device_eval_batch_size": 64, "train.max_steps": 120, "train.warmup_ratio": 0.0,
        "train.logging_steps": 5, "train.eval_steps": 40, "train.save_steps": 40, "data.max_eval_samples": 64,
        **settings})


def digit_lists(n: int, seed: int = 0) -> list[list[int]]:
    """The first `n` lists of a reproducible stream: 3 to 6 digits, not all equal, no list twice."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < n:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(3, 6)))
        if digits not in seen and len(set(digits)) > 1:
            seen.add(digits)
            out.append(list(digits))
    return out


def split_lists(split: str, seed: int = 0) -> list[list[int]]:
    """The lists of `split`: "train" (the first N_TRAIN of the stream) or "test" (the next N_TEST)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    lists = digit_lists(N_TRAIN + (N_TEST if split == "test" else 0), seed)
    return lists[:N_TRAIN] if split == "train" else lists[N_TRAIN:]


def wrong_order(digits: list[int], rng: random.Random) -> list[int]:
    """The same digits in an order other than sorted (a wrong answer)."""
    target = sorted(digits)
    while True:
        candidate = digits[:]
        rng.shuffle(candidate)
        if candidate != target:
            return candidate


def words(digits: list[int]) -> str:
    """Digits as text: [3, 1, 2] -> "3 1 2"."""
    return " ".join(map(str, digits))


def prompt(digits: list[int]) -> str:
    """The task as plain text: "sort: 3 1 2 =" (the answer follows as " 1 2 3")."""
    return f"sort: {words(digits)} ="


def question(digits: list[int]) -> str:
    """The task as a chat user message: "sort: 3 1 2"."""
    return f"sort: {words(digits)}"


# ---- the preference methods' demo data (builtin:sort, builtin:sort-chat), registered by the core ----

def sort_pairs(n: int, seed: int, offset: int = 0) -> list[dict[str, str]]:
    """`n` standard explicit-prompt pairs; `offset` skips that many lists of the same stream."""
    rng = random.Random(seed + 1)
    rows = []
    for digits in digit_lists(offset + n, seed)[offset:]:
        rows.append({"prompt": prompt(digits), "chosen": f" {words(sorted(digits))}",
                     "rejected": f" {words(wrong_order(digits, rng))}"})
    return rows


def _to_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    return {
        "prompt": [{"role": "user", "content": row["prompt"].removesuffix(" =")}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }


def load_sort(name: str, split: str):
    """`sort` (standard) or `sort-chat` (conversational) preference pairs, split `train` or `test`: the chosen
    answer is the sorted list, the rejected one the same digits in a wrong order."""
    import datasets

    rows = sort_pairs(N_TRAIN, seed=0) if split == "train" else sort_pairs(N_TEST, seed=0, offset=N_TRAIN)
    if name == "sort-chat":
        rows = [_to_chat(r) for r in rows]
    return datasets.Dataset.from_list(rows)


#: the built-in preference datasets the core registers (alignkit.formatters' register_datasets)
SORT_DATASETS = ("sort", "sort-chat")
#: the built-in prompt dataset for online methods the core registers: `prompt` and the `answer` column
SORT_PROMPTS = "sort-prompts"


def prompt_answer_rows(split: str) -> list[dict[str, str]]:
    """`prompt` ("sort: 3 1 2 =") and `answer` (" 1 2 3") for the lists of `split`: an online method's demo
    prompts, the answer for rewards such as exact-match."""
    return [{"prompt": prompt(d), "answer": " " + words(sorted(d))} for d in split_lists(split)]


def load_sort_prompts(split: str):
    """`builtin:sort-prompts`, split `train` or `test` (prompt_answer_rows as a datasets.Dataset)."""
    import datasets

    return datasets.Dataset.from_list(prompt_answer_rows(split))


def sft_warmup(model, tokenizer, steps: int, lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> None:
    """`steps` of next-token training on the demo's prompt + answer + EOS (loss on the answer only), in place, from
    its own seeded generator (the same start in every process and after a resume): an online method's demo starts
    RL from a model that sometimes gets the task right."""
    start = time.time()
    encoded = []
    for r in prompt_answer_rows("train"):
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p + a, [-100] * len(p) + a))
    loss = _supervised_steps(model, tokenizer, encoded, steps, lr, batch_size, seed, mask_by_length=False)
    log.info("demo warm-up: %d supervised steps in %.1fs (last loss %.3f)", steps, time.time() - start, loss)


def _supervised_steps(model, tokenizer, encoded, steps, lr, batch_size, seed, mask_by_length: bool) -> float:
    """`steps` AdamW steps on random batches (its own seeded generator) of (ids, labels) rows, right-padded; the
    attention mask covers each row's length, or (mask_by_length=False) every token that is not the pad id. The last
    loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    was_training = model.training
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.tensor([encoded[i][0] + [tokenizer.pad_token_id] * (width - len(encoded[i][0])) for i in idx])
        labels = torch.tensor([encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in idx])
        if mask_by_length:
            mask = torch.tensor([[1] * len(encoded[i][0]) + [0] * (width - len(encoded[i][0])) for i in idx])
        else:
            mask = (ids != tokenizer.pad_token_id).long()
        loss = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                     labels=labels.to(model.device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    return loss.item()


def conversation_labels(tokenizer, messages: list[dict], tools=None) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a worked episode rendered with the chat template: labels are the ids on the assistant
    turns (the template's generation markers), -100 elsewhere and on an assistant message marked `"train": False`
    (context the model reads, e.g. the tool call before the answer that copies its result)."""
    def render(msgs, **kw):
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True, **kw)["input_ids"]

    r = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
    ids, trained = list(r["input_ids"]), list(r["assistant_masks"])
    for i, message in enumerate(messages):
        if message.get("role") == "assistant" and message.get("train") is False:
            start, end = len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i + 1]))
            trained[start:end] = [0] * (end - start)
    return ids, [t if m else -100 for t, m in zip(ids, trained)]


def sft_warmup_conversations(model, tokenizer, conversations: list[list[dict]] | tuple[list[list[dict]], ...],
                             steps: int, tools=None, lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> None:
    """`steps` of next-token training on worked episodes (conversations rendered with the chat template and
    `tools`, loss on the assistant turns only: the template's generation markers, less the messages marked
    `"train": False`), in place, from its own seeded generator: a multi-turn demo (e.g. the calculator's) starts RL
    from a model that knows the tool-call format. A tuple of lists of episodes is a curriculum: its stages are
    trained one after another, the steps shared equally (e.g. first a skill alone, then the mix that uses it)."""
    stages = conversations if isinstance(conversations, tuple) else (conversations,)
    for i, stage in enumerate(stages):
        n = steps // len(stages) + (1 if i < steps % len(stages) else 0)
        _sft_on_conversations(model, tokenizer, stage, n, tools, lr, batch_size, seed + i)


def _sft_on_conversations(model, tokenizer, conversations, steps, tools, lr, batch_size, seed) -> None:
    start = time.time()
    encoded = [conversation_labels(tokenizer, messages, tools) for messages in conversations]
    loss = _supervised_steps(model, tokenizer, encoded, steps, lr, batch_size, seed, mask_by_length=True)
    log.info("demo warm-up: %d supervised steps on worked episodes in %.1fs (last loss %.3f)", steps,
             time.time() - start, loss)

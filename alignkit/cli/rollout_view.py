"""`alignkit rollout`: one rollout of an online method as a person reads it: each prompt's samples, turn by turn
(the model's and, with method.environment, the environment's), which tokens are trained, and the rewards."""

import torch

from alignkit.cli.format_view import _render
from alignkit.config import RunConfig, train_data
from alignkit.engine.data import load_data, prepare
from alignkit.engine.modeling import load_model, load_tokenizer
from alignkit.errors import ConfigError
from alignkit.online.generation import Generator
from alignkit.online.rollout import build_rollout
from alignkit.plugin.context import StepContext, call
from alignkit.plugin.method import Method


class _NoWrap:
    """The generation handle's accelerator: a lone model, nothing to unwrap."""

    @staticmethod
    def unwrap_model(model):
        return model


def _segments(mask: list[int]) -> list[tuple[int, int, bool]]:
    """(start, stop, trained) of each run of equal mask values."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((start, i, bool(mask[start])))
            start = i
    return out


def show_rollout(config: RunConfig, method: Method, count: int, pm, color: bool = False) -> str:
    """The rollout of the first `count` training prompts at step 0 from the run's starting model (after its
    formatter's own preparation, e.g. the demo's warm-up)."""
    if method.rollout is None:
        raise ConfigError(f"method {method.name!r} has no rollout (it trains on fixed data); `alignkit format "
                          f"--method {method.name}` shows its examples")
    tokenizer = load_tokenizer(config.model)
    rollout = build_rollout(method, config, tokenizer, pm)
    formatter = method.formatter(config.method, tokenizer)
    source = train_data(config)
    raw = load_data(source, config.data.train_split)
    formatted, _ = prepare(raw.select(range(min(count, len(raw)))), formatter, source)
    model = load_model(config.model, tokenizer, config.train.seed, method.model_kind, method.num_labels)
    prepare_model = getattr(formatter, "prepare_model", None)
    if prepare_model is not None:
        prepare_model(model)
    ctx = StepContext(training=True, step=0, micro_batch=0, micro_batches=1,
                      generator=Generator(model, _NoWrap(), tokenizer, config.train.seed))
    with torch.no_grad():
        out = call(rollout, formatter.collate(list(formatted)), ctx=ctx)
    attention = out.get("completion_attention_mask", out["completion_mask"])
    names = out.get("reward_names", [])
    lines = [f"{source}: {len(formatted)} prompts, {out['completion_ids'].shape[0]} samples at step 0 by the "
             f"{method.name} rollout; {'green' if color else '[[bracketed]]'} tokens are trained (completion_mask), "
             "plain ones are not (the environment's)", ""]
    for row in range(out["completion_ids"].shape[0]):
        prompt = out["prompt_ids"][row][out["prompt_mask"][row].bool()].tolist()
        width = int(attention[row].sum())
        ids, mask = out["completion_ids"][row][:width].tolist(), out["completion_mask"][row][:width].tolist()
        rewards = ", ".join(f"{n}={float(v):.3g}" for n, v in zip(names, out["rewards_per_func"][row].tolist()))
        stats = {k: int(v[row]) for k, v in out.get("episode_stats", {}).items()}
        lines.append(f"--- sample {row}: reward {float(out['rewards'][row]):.3g} ({rewards})"
                     + "".join(f", {k} {v}" for k, v in stats.items()))
        lines.append(f"prompt ({len(prompt)} tokens):")
        lines.append("  " + tokenizer.decode(prompt).replace("\n", "\n  "))
        turn = 0
        for start, stop, trained in _segments(mask):
            if trained:
                turn += 1
            who = f"model turn {turn}" if trained else "environment"
            lines.append(f"{who} ({stop - start} tokens, {'trained' if trained else 'not trained'}):")
            text = _render(tokenizer, ids[start:stop], mask[start:stop], 0, color)
            lines.append("  " + text.replace("\n", "\n  "))
        lines.append("")
    return "\n".join(lines) + "\n"

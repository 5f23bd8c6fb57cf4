"""Multi-turn rollouts, token in / token out: model turns and environment turns alternate in one token stream.

Each episode starts from the environment's first observation (`reset(row)`, rendered with the chat template and the
environment's tool schemas; or the row's prompt tokens as the formatter made them). A model turn is sampled as a
continuation of the episode's exact tokens so far and kept as sampled (never re-tokenized); the environment's reply
(`step(assistant message)`) is rendered as the chat template renders those messages after an assistant turn (the
turn's closing, then the messages, then the generation prompt) and appended. The completion is every token after the
prompt: `completion_mask` is 1 on the model's tokens only (the loss and the KL), `completion_attention_mask` 1 on all
of them. An episode ends when the environment says so, after `max_turns` model turns, or when its tokens reach
`max_completion_length` (then it is truncated).

Sampling is reproducible per episode: turn 0 samples the group of each prompt with the rollout's own seed, as a
single-turn rollout does; turn t > 0 continues each unfinished episode (one sample of its own context, seeded by
(the rollout's seed, t, the context's tokens, the index among equal contexts)), so nothing depends on how prompts are
batched or split over processes, and a resumed run samples what the uninterrupted one did.
"""

import logging

import torch

from alignkit.errors import ConfigError
from alignkit.online.environments import EnvironmentSpec, resolve_all

log = logging.getLogger(__name__)

PROBE = "\u2063ALIGNKIT\u2063"  # a content no template writes itself, to find where it puts an assistant's text


class TurnRenderer:
    """Messages as the tokenizer's chat template renders them (with `tools`), token by token."""

    def __init__(self, tokenizer, tools: list[dict] | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("method.environment: multi-turn rollouts render the environment's messages with the "
                              f"chat template, and the tokenizer ({tokenizer.name_or_path}) has none; use a model "
                              "with a chat template (model.tokenizer_name_or_path)")
        self.tokenizer, self.tools = tokenizer, tools or None
        base = self.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE}])
        self.closing = self.encode(base[base.rindex(PROBE) + len(PROBE):])  # the template's end of a model turn
        #: the model's turn ends at EOS or at the template's own end-of-turn token
        self.stop_ids = [tokenizer.eos_token_id] + [t for t in self.closing[:1] if t in tokenizer.all_special_ids
                                                    and t != tokenizer.eos_token_id]

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render(messages, generation_prompt=True))

    def reply(self, model_ids: list[int], messages: list[dict]) -> list[int]:
        """The tokens after a model turn `model_ids`: the rest of the template's closing of that turn, then
        `messages` as the template renders them after an assistant turn, then the generation prompt."""
        base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE}]
        before, after = self.render(base), self.render(base + list(messages), generation_prompt=True)
        if not after.startswith(before):
            raise ConfigError("method.environment: the chat template renders an assistant turn differently when "
                              "messages follow it, so the environment's tokens cannot be appended to the model's")
        closing = self.closing[1:] if model_ids and self.closing and model_ids[-1] == self.closing[0] else self.closing
        return list(closing) + self.encode(after[len(before):])


class Episode:
    """One episode's environment, tokens (model tokens marked trained) and counts."""

    def __init__(self, env, row: dict, prompt_ids: list[int]) -> None:
        self.env, self.row, self.prompt_ids = env, row, prompt_ids
        self.ids: list[int] = []
        self.trained: list[int] = []
        self.turns, self.done, self.truncated = 0, False, False
        self.rewards: dict[str, float] = {}
        self.last_turn: list[int] = []

    def context(self) -> list[int]:
        return self.prompt_ids + self.ids

    def add(self, ids: list[int], trained: bool) -> None:
        self.ids += ids
        self.trained += [int(trained)] * len(ids)


def run_episodes(spec: EnvironmentSpec, rows: list[dict], prompts: list[list[int]], n: int, tokenizer, generator,
                 config, seed: int, max_turns: int) -> list[Episode]:
    """`n` episodes of each prompt row (rows[i] with formatter tokens prompts[i]), in row order."""
    probe = spec.build()
    renderer = TurnRenderer(tokenizer, [s for s in (getattr(probe, "tool_schemas", None) or [])])
    episodes = []
    for row, ids in zip(rows, prompts):
        for _ in range(n):
            env = spec.build()
            episodes.append((env, row, ids))
    firsts = resolve_all([env.reset(row) for env, row, _ in episodes])
    episodes = [Episode(env, row, renderer.prompt(first) if first else list(ids))
                for (env, row, ids), first in zip(episodes, firsts)]
    budget = config.max_completion_length
    per_turn = getattr(config, "max_turn_length", None) or budget
    sampling = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
                "stop_token_ids": renderer.stop_ids}
    for turn in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        if turn == 0:  # each prompt's group, as a single-turn rollout samples it
            firsts = [active[i].context() for i in range(0, len(active), n)]
            samples = [c for group in generator.generate(firsts, n=n, max_new_tokens=min(per_turn, budget), seed=seed,
                                                         **sampling) for c in group]
        else:
            room = min(per_turn, max(budget - len(e.ids) for e in active))
            samples = [g[0] for g in generator.generate([e.context() for e in active], n=1, max_new_tokens=room,
                                                        seed=hash_turn(seed, turn), **sampling)]
        for e, sample in zip(active, samples):
            sample = sample[:budget - len(e.ids)]
            e.add(sample, trained=True)
            e.turns, e.last_turn = e.turns + 1, sample
        messages = [{"role": "assistant", "content": tokenizer.decode(e.last_turn, skip_special_tokens=True)}
                    for e in active]
        replies = resolve_all([e.env.step(m) for e, m in zip(active, messages)])
        for e, reply in zip(active, replies):
            observation, parts, done = _checked(spec.name, reply)
            for key, value in parts.items():
                e.rewards[key] = e.rewards.get(key, 0.0) + float(value)
            if done or not observation:
                e.done = True
                continue
            if turn + 1 == max_turns:  # no model turn left to read the observation
                e.done = e.truncated = True
                continue
            tokens = renderer.reply(e.last_turn, observation)
            if len(e.ids) + len(tokens) >= budget:
                e.add(tokens[:budget - len(e.ids)], trained=False)
                e.done = e.truncated = True
                continue
            e.add(tokens, trained=False)
    for e in episodes:
        if not e.done:
            e.done = e.truncated = True
    return episodes


def hash_turn(seed: int, turn: int) -> int:
    from alignkit.online.generation import mix_seed

    return mix_seed(seed, "turn", turn)


def _checked(name: str, reply) -> tuple[list | None, dict, bool]:
    from alignkit.errors import PluginError

    if not (isinstance(reply, tuple) and len(reply) == 3):
        raise PluginError(f"environment {name!r}: step() returned {type(reply).__name__}, not (messages | None, "
                          "reward parts, done)")
    observation, parts, done = reply
    if observation is not None and not (isinstance(observation, list)
                                        and all(isinstance(m, dict) and "role" in m for m in observation)):
        raise PluginError(f"environment {name!r}: step() returned an observation that is not a list of messages "
                          "({'role': ..., 'content': ...})")
    if not isinstance(parts, dict):
        raise PluginError(f"environment {name!r}: step() returned reward parts {parts!r}, not a dict {{name: float}}")
    return observation, parts, bool(done)


def episode_batch(episodes: list[Episode], pad_id: int, reward_names: list[str]) -> dict:
    """The rollout's tensors for `episodes`: prompt ids/mask (left-padded), completion ids, the trained mask and
    the attention mask (right-padded), lengths, truncation, each episode's environment rewards [N, R] (NaN where a
    part was never given) and its counts (`episode_stats`)."""
    from alignkit.online.completions import pad_rows

    prompt_ids, prompt_mask = pad_rows([e.prompt_ids for e in episodes], pad_id, left=True)
    completion_ids, attention = pad_rows([e.ids for e in episodes], pad_id, left=False)
    trained, _ = pad_rows([e.trained for e in episodes], 0, left=False)
    env_rewards = torch.tensor([[e.rewards.get(k, float("nan")) for k in reward_names] for e in episodes],
                               dtype=torch.float32).reshape(len(episodes), len(reward_names))
    stats = {"turns": [e.turns for e in episodes]}
    for key in ("calls", "well_formed", "errors"):
        if all(hasattr(e.env, key) for e in episodes):
            stats[f"tool_{key}"] = [getattr(e.env, key) for e in episodes]
    if "tool_well_formed" in stats:  # the share of episodes with a well-formed call of a tool
        stats["tool_used"] = [float(w > 0) for w in stats["tool_well_formed"]]
    errors = [line for e in episodes for line in getattr(e.env, "log", [])]
    if errors:
        log.debug("environment: %d tool call errors this rollout (first: %s)", len(errors), errors[0])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": trained, "completion_attention_mask": attention,
            "completion_length": torch.tensor([len(e.ids) for e in episodes]),
            "is_truncated": torch.tensor([e.truncated for e in episodes]), "env_rewards": env_rewards,
            "episode_stats": {k: torch.tensor(v, dtype=torch.float32) for k, v in stats.items()}}

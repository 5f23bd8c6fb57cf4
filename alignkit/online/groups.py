"""A rollout's common part for methods that sample a group of completions per prompt and score them with rewards
(group-relative policy optimisation, leave-one-out REINFORCE, ...): subclass `GroupRollout`, call
`sample_and_score(batch, ctx)` in `__call__`, and add what the loss needs (log-probs, advantages in `finish`).

It reads these fields of the method's config (TRL's names): `num_generations`, `max_completion_length`,
`temperature`, `top_p`, `top_k`, `reward_funcs`, `reward_weights` (None: all 1) and, when present,
`mask_truncated_completions`, `num_iterations` and `max_staleness`; and its own keys (`config_class`, added to the
method's config): `environment` (multi-turn rollouts in a registered environment, alignkit.online.multiturn),
`environment_options`, `max_turns`.

Prompt rows with images (a vision-language policy): each row's image features (alignkit.formatters.prompt_only) go
to the generation handle with its prompt, and the rolled-out batch carries them collated for its N rows (each
prompt's images repeated for its completions: `pixel_values`, ... as `alignkit.formatters.vision.vision_inputs` picks
them), so the policy's, the old policy's and the reference's log-prob forwards read them (`completion_inputs`).

Completions of conversational prompts end at EOS or at the chat template's end-of-turn token where that is another
added token (the built-in template's `<|end|>`; for most chat models EOS is that token), and the rewards read the
completion's text without its stop token.
"""

import math

import torch

from alignkit.blocks.dropout import disable_dropout
from alignkit.blocks.lmhead import LMHead
from alignkit.blocks.logps import TokenScorer
from alignkit.formatters.vision import VISION_INPUTS
from alignkit.online.completions import pad_rows
from alignkit.online.environments import EnvironmentConfig, EnvironmentRegistry
from alignkit.online.generation import mix_seed
from alignkit.online.rewards import RewardRegistry, score
from alignkit.plugin.loss import Loss


def combine(rewards_NF: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted sum over the reward functions that applied; NaN where none did."""
    w = torch.tensor(weights, dtype=rewards_NF.dtype, device=rewards_NF.device)
    total = (rewards_NF.nan_to_num(0.0) * w).sum(-1)
    return total.masked_fill(torch.isnan(rewards_NF).all(-1), float("nan"))


def sums(x: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of the non-NaN values, float64: summed over micro-batches and processes, they
    give the step's mean and std (`std_from_sums`)."""
    ok = ~torch.isnan(x)
    v = x.nan_to_num(0.0).double()
    return torch.stack([v.sum(), (v * v).sum(), ok.sum().double()])


def std_from_sums(total: float, squares: float, count: float) -> float:
    """Sample std (Bessel) from a sum, a sum of squares and a count; NaN with fewer than two values."""
    if count < 2:
        return float("nan")
    mean = total / count
    return math.sqrt(max(squares - count * mean * mean, 0.0) / (count - 1))


class GroupRollout:
    """Built once per run as `Rollout(config, tokenizer, rewards=registry)` (the engine passes the registry)."""

    #: mixed into every sampling seed (a method may keep its own stream of samples)
    seed_tag: tuple = ()
    #: the method config's keys this rollout adds (the environment of multi-turn rollouts)
    config_class = EnvironmentConfig

    def __init__(self, config, tokenizer, rewards: RewardRegistry | None = None) -> None:
        self.config, self.tokenizer = config, tokenizer
        registry = rewards or RewardRegistry()
        self.rewards = registry.select(config.reward_funcs)
        self.weights = config.reward_weights or [1.0] * len(self.rewards)
        self.environment = None
        if getattr(config, "environment", None):  # checked here, before any work: one line for a wrong name
            self.environment = EnvironmentRegistry.from_plugins(registry.pm).select(config.environment,
                                                                                   config.environment_options)
            self.weights = [*self.weights, *[1.0] * len(self.environment.reward_names)]

    @property
    def iterations(self) -> int:
        """Optimisation passes over each rollout (num_iterations)."""
        return getattr(self.config, "num_iterations", 1)

    @property
    def max_staleness(self) -> int:
        """Steps a rollout may be sampled ahead of the step that trains it (async rollouts)."""
        return getattr(self.config, "max_staleness", 0)

    def sample_and_score(self, batch: dict, ctx) -> dict:
        """`num_generations` completions of each prompt row, sampled reproducibly from (the step, the prompt), and
        their rewards, on `ctx.device`:

          prompt_ids / prompt_mask          [N, P] left-padded, N = rows x num_generations (each prompt repeated)
          completion_ids / completion_mask  [N, C] right-padded (mask zero on truncated rows with
                                            mask_truncated_completions)
          completion_length [N], is_truncated [N], rewards [N] (the weighted sum; NaN where no function applied),
          rewards_per_func [N, F], reward_names
        """
        cfg, tok, n = self.config, self.tokenizer, self.config.num_generations
        prompts = [ids[mask.bool()].tolist()
                   for ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        phase = ("train", ctx.step) if ctx.training else ("eval",)  # eval samples the same way at every evaluation
        if self.environment is not None:
            out = self.episodes(batch, prompts, ctx, mix_seed(*self.seed_tag, *phase))
            return {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        images, stops = image_rows(batch), self.stop_ids(batch)
        groups = ctx.generator.generate(prompts, n=n, max_new_tokens=cfg.max_completion_length,
                                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                        stop_token_ids=stops, seed=mix_seed(*self.seed_tag, *phase),
                                        **({} if images is None else {"images": images}))
        completions = [c for group in groups for c in group]
        stop = {*stops, tok.pad_token_id}
        truncated = torch.tensor([not c or c[-1] not in stop for c in completions])
        prompt_ids, prompt_mask = pad_rows(prompts, tok.pad_token_id, left=True)
        completion_ids, completion_mask = pad_rows(completions, tok.pad_token_id, left=False)
        if getattr(cfg, "mask_truncated_completions", False):
            completion_mask = completion_mask * (~truncated)[:, None].long()
        out = {"prompt_ids": prompt_ids.repeat_interleave(n, 0), "prompt_mask": prompt_mask.repeat_interleave(n, 0),
               "completion_ids": completion_ids, "completion_mask": completion_mask,
               "completion_length": torch.tensor([len(c) for c in completions]), "is_truncated": truncated,
               **self.score(batch, completions)}
        if images is not None:  # each prompt's images for each of its completions
            out.update(ctx.generator.vision().collate([f for f in images for _ in range(n)]))
        return {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def stop_ids(self, batch: dict) -> list[int]:
        """EOS, and for conversational prompts the chat template's end-of-turn token when it is another added token."""
        eos = self.tokenizer.eos_token_id
        if not any(isinstance(p, list) for p in batch.get("prompt", [])):
            return [eos]
        if not hasattr(self, "_turn_end"):
            self._turn_end = turn_end_token(self.tokenizer)
        return [eos] if self._turn_end in (None, eos) else [eos, self._turn_end]

    def episodes(self, batch: dict, prompts: list[list[int]], ctx, seed: int) -> dict:
        """Multi-turn rollouts in the configured environment (alignkit.online.multiturn): the keys of
        `sample_and_score`, with `completion_mask` 1 on the model's tokens only, `completion_attention_mask` 1 on
        every token, the environment's reward parts as more reward columns (`env/NAME`, weight 1, summed over
        the turns) and `episode_stats` (turns, tool calls per episode). Rewards score the last model turn."""
        from alignkit.online.multiturn import episode_batch, run_episodes

        cfg, n = self.config, self.config.num_generations
        rows = [{k: batch[k][i] for k in batch if k not in ("prompt_input_ids", "prompt_attention_mask")}
                for i in range(len(prompts))]
        episodes = run_episodes(self.environment, rows, prompts, n, self.tokenizer, ctx.generator, cfg, seed,
                                cfg.max_turns)
        out = episode_batch(episodes, self.tokenizer.pad_token_id, self.environment.reward_names)
        if getattr(cfg, "mask_truncated_completions", False):
            out["completion_mask"] = out["completion_mask"] * (~out["is_truncated"])[:, None].long()
        scored = self.score(batch, [e.last_turn for e in episodes])
        per_func = torch.cat([scored["rewards_per_func"], out.pop("env_rewards")], 1)
        names = scored["reward_names"] + [f"env/{k}" for k in self.environment.reward_names]
        return {**out, "rewards": combine(per_func, self.weights), "rewards_per_func": per_func,
                "reward_names": names}

    def score(self, batch: dict, completions: list[list[int]]) -> dict:
        """Each completion's rewards (per function, and their weighted sum), the prompt row's columns passed on."""
        n = self.config.num_generations
        end = getattr(self, "_turn_end", None)
        texts = self.tokenizer.batch_decode([c[:-1] if end is not None and c and c[-1] == end else c
                                             for c in completions], skip_special_tokens=True)
        skip = {"prompt_input_ids", "prompt_attention_mask", "prompt", *VISION_INPUTS}
        columns = {key: [v for v in values for _ in range(n)] for key, values in batch.items() if key not in skip}
        prompts = [p for p in batch["prompt"] for _ in range(n)]
        per_func = score(self.rewards, prompts, texts, columns)
        return {"rewards": combine(per_func, self.weights[:len(self.rewards)]), "rewards_per_func": per_func,
                "reward_names": [name for name, _ in self.rewards]}


def turn_end_token(tokenizer) -> int | None:
    """The first token the chat template writes after an assistant's text when it is an added token (a whole marker
    such as `<|end|>` or `<|im_end|>`), else None (no template, or text that only ends a turn by convention)."""
    from alignkit.online.multiturn import PROBE

    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        turn = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # a template that refuses this probe conversation: no end-of-turn token to stop at
        return None
    ids = tokenizer(text[text.rindex(PROBE) + len(PROBE):], add_special_tokens=False)["input_ids"]
    return ids[0] if ids and ids[0] in tokenizer.added_tokens_encoder.values() else None


def image_rows(batch: dict) -> list[dict] | None:
    """Each prompt row's image features (the prompt-only formatter's, one list per row), or None when no row has
    images."""
    keys = [k for k in VISION_INPUTS if k in batch]
    if not any(v for k in keys for v in batch[k]):
        return None
    return [{k: batch[k][i] for k in keys} for i in range(len(batch["prompt_input_ids"]))]


class GroupLoss(Loss):
    """The common part of a group method's loss: dropout off, the policy's LM head split off for the fused head in
    training (`head`; None: checkpointed chunks), a token scorer at the sampling temperature (`scorer`), and a
    reference model only when `beta` != 0, mixed toward the policy every `ref_model_sync_steps` optimizer steps when
    the config sets `sync_ref_model` (TRL's SyncRefModelCallback; Loss.reference_sync)."""

    head: LMHead | None = None

    def __init__(self, config) -> None:
        super().__init__(config)
        self.scorer = TokenScorer.from_config(config, temperature=config.temperature,
                                              share_prefix=getattr(config, "share_prompt", True))
        if getattr(config, "sync_ref_model", False):
            self.reference_sync = (config.ref_model_sync_steps, config.ref_model_mixup_alpha)

    @property
    def needs_reference_model(self) -> bool:  # beta == 0 loads no reference model
        return self.config.beta != 0.0

    def prepare_model(self, model) -> None:
        disable_dropout(model)
        self.head = self.scorer.head_of(model)

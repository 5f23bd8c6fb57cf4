"""The rollout stage: sample a group of completions per prompt, score them, and turn rewards into advantages.

The engine calls it without gradient on each micro-batch of prompt rows (from the prompt-only formatter:
`prompt_input_ids` right-padded with `prompt_attention_mask`, `prompt` and the row's other columns as lists)
then `finish` on all of the step's micro-batches (the advantages need the step-wide reward std), and
hands the batches to the reference and the loss:

  prompt_ids / prompt_mask          [N, P] left-padded, N = rows x num_generations (each prompt repeated)
  completion_ids / completion_mask  [N, C] right-padded (mask zero on truncated rows with
                                    mask_truncated_completions)
  advantages [N]; old_logps [N, C] (num_iterations > 1: the policy's log-probs at sampling time)
  rewards [N], rewards_per_func [N, F], reward_names, reward_std [N], zero_std [N],
  completion_length [N], is_truncated [N]   (for the metrics)
"""

import torch

from alignkit.online.completions import completion_logps, pad_rows
from alignkit.online.generation import mix_seed
from alignkit.online.rewards import RewardRegistry, score
from alignkit_grpo.advantages import EPS, advantages, combine, normalize_then_sum, std_from_sums, sums
from alignkit_grpo.config import GRPOConfig


class GRPORollout:
    """Built once per run as `GRPORollout(config, tokenizer, rewards=registry)`."""

    def __init__(self, config: GRPOConfig, tokenizer, rewards: RewardRegistry | None = None) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.rewards = (rewards or RewardRegistry()).select(config.reward_funcs)
        self.weights = config.reward_weights or [1.0] * len(self.rewards)

    @property
    def generation_backend(self) -> str:
        """The sampler the engine's generation handle uses (method.generation_backend)."""
        return self.config.generation_backend

    @property
    def max_staleness(self) -> int:
        """Steps a rollout may be sampled ahead of the step that trains it (async rollouts)."""
        return self.config.max_staleness

    @property
    def iterations(self) -> int:
        """Optimisation passes over each rollout (GRPO's num_iterations)."""
        return self.config.num_iterations

    def __call__(self, batch: dict, ctx) -> dict:
        cfg, tok, G = self.config, self.tokenizer, self.config.num_generations
        prompts = [ids[mask.bool()].tolist()
                   for ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        phase = ("train", ctx.step) if ctx.training else ("eval",)  # eval samples the same way at every evaluation
        groups = ctx.generator.generate(prompts, n=G, max_new_tokens=cfg.max_completion_length,
                                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                        stop_token_ids=[tok.eos_token_id], seed=mix_seed(*phase))
        completions = [c for group in groups for c in group]
        stop = {tok.eos_token_id, tok.pad_token_id}
        truncated = torch.tensor([not c or c[-1] not in stop for c in completions])
        prompt_ids, prompt_mask = pad_rows(prompts, tok.pad_token_id, left=True)
        completion_ids, completion_mask = pad_rows(completions, tok.pad_token_id, left=False)
        out = {"prompt_ids": prompt_ids.repeat_interleave(G, 0), "prompt_mask": prompt_mask.repeat_interleave(G, 0),
               "completion_ids": completion_ids, "completion_length": completion_mask.sum(-1),
               "is_truncated": truncated}
        if cfg.mask_truncated_completions:
            completion_mask = completion_mask * (~truncated)[:, None].long()
        out["completion_mask"] = completion_mask
        out.update(self._score(batch, completions, ctx))
        out = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        if self.iterations > 1 and ctx.training:
            out["old_logps"] = completion_logps(ctx.generator.model, out, cfg.temperature, cfg.logits_chunk_size)[0]
        if cfg.max_staleness and ctx.training:  # the sampling policy's log-probs, for the importance weights
            out["sampling_logps"] = completion_logps(ctx.generator.model, out, cfg.temperature,
                                                     cfg.logits_chunk_size)[0]
        return out

    def _score(self, batch: dict, completions: list[list[int]], ctx) -> dict:
        """Each completion's rewards (per function, and their weighted sum)."""
        G = self.config.num_generations
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        skip = {"prompt_input_ids", "prompt_attention_mask", "prompt"}
        columns = {k: [v for v in values for _ in range(G)] for k, values in batch.items() if k not in skip}
        prompts = [p for p in batch["prompt"] for _ in range(G)]
        per_func = score(self.rewards, prompts, texts, columns)
        return {"rewards": combine(per_func, self.weights), "rewards_per_func": per_func,
                "reward_names": [name for name, _ in self.rewards]}

    def finish(self, batches: list[dict], ctx) -> list[dict]:
        """Advantages, once every micro-batch of the step is rolled out: the batch std (scale_rewards=batch,
        and the logged reward_std) spans all of the step's completions on every process, as TRL's generation
        batch does (at eval, each batch on its own: processes may hold different numbers of eval batches).
        normalize_then_sum normalises each function's rewards within groups, then their weighted sum over the
        step (mean and std over the same span)."""
        cfg = self.config
        gdpo = cfg.multi_objective_aggregation == "normalize_then_sum"
        if gdpo:
            for b in batches:
                b["aggregated"] = normalize_then_sum(b["rewards_per_func"], cfg.num_generations, self.weights)
        keys = ("rewards", "aggregated") if gdpo else ("rewards",)
        totals = torch.zeros(3 * len(keys), dtype=torch.float64, device=ctx.device)
        for b in batches:
            totals += torch.cat([sums(b[k]) for k in keys])
        if ctx.training:
            totals = ctx.reduce(totals, "sum")
        batch_std = std_from_sums(*totals[:3].tolist())
        if gdpo:
            total, _, count = totals[3:].tolist()
            mean, std = total / count if count else float("nan"), std_from_sums(*totals[3:].tolist())
        for b in batches:
            if gdpo:
                adv = ((b.pop("aggregated") - mean) / (std + EPS)).nan_to_num(0.0)
                zero = torch.full_like(b["rewards"], std)
            else:
                adv, zero = advantages(b["rewards"], cfg.num_generations, cfg.scale_rewards, batch_std)
            b.update(advantages=adv.float(), reward_std=torch.full_like(b["rewards"], batch_std),
                     zero_std=torch.isclose(zero, torch.zeros_like(zero)))
        return batches

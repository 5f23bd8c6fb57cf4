"""The rollout stage: k completions per prompt, their rewards, the KL penalty and the leave-one-out advantages.

The engine calls it without gradient on each micro-batch of prompt rows (the core's prompt-only formatter), then
`finish` on all of the step's micro-batches, and hands the batches to the loss:

  prompt_ids / prompt_mask          [N, P] left-padded, N = rows x num_generations (each prompt repeated)
  completion_ids / completion_mask  [N, C] right-padded (mask zero on truncated rows with
                                    mask_truncated_completions)
  advantages [N]; old_logps [N] (num_iterations > 1: each completion's summed log-prob at sampling time)
  rewards [N], rewards_per_func [N, F], reward_names, reward_std [N], zero_std [N], kl_sum [N] (beta > 0),
  completion_length [N], is_truncated [N]   (for the metrics)

As TRL's RLOOTrainer: the reward is the weighted sum of the reward functions (clipped to reward_clip_range), less
beta x the completion's summed first-order KL log(pi_old / pi_ref); a completion's baseline is the mean reward of
the other scorable completions of its prompt; an unscorable completion (no function applied) gets advantage 0.
"""

import math

import torch

from alignkit.online.completions import completion_logps, pad_rows
from alignkit.online.generation import mix_seed
from alignkit.online.rewards import RewardRegistry, score
from alignkit_rloo.config import RLOOConfig


def combine(rewards_NF: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted sum over the reward functions that applied; NaN where none did."""
    w = torch.tensor(weights, dtype=rewards_NF.dtype, device=rewards_NF.device)
    total = (rewards_NF.nan_to_num(0.0) * w).sum(-1)
    return total.masked_fill(torch.isnan(rewards_NF).all(-1), float("nan"))


def leave_one_out(rewards_N: torch.Tensor, k: int) -> torch.Tensor:
    """reward - mean of the other scorable rewards of its group of k (NaN where unscorable or alone)."""
    groups = rewards_N.view(-1, k)
    scorable = (~torch.isnan(groups)).sum(1, keepdim=True)
    total = torch.nansum(groups, 1, keepdim=True)
    return (groups - (total - groups) / (scorable - 1)).reshape(-1)


def std_from_sums(total: float, squares: float, count: float) -> float:
    """Sample std (Bessel) from a sum, a sum of squares and a count; NaN with fewer than two values."""
    if count < 2:
        return float("nan")
    mean = total / count
    return math.sqrt(max(squares - count * mean * mean, 0.0) / (count - 1))


def _sums(x: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of the non-NaN values, float64."""
    ok = ~torch.isnan(x)
    v = x.nan_to_num(0.0).double()
    return torch.stack([v.sum(), (v * v).sum(), ok.sum().double()])


class RLOORollout:
    """Built once per run as `RLOORollout(config, tokenizer, rewards=registry)`."""

    def __init__(self, config: RLOOConfig, tokenizer, rewards: RewardRegistry | None = None) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.rewards = (rewards or RewardRegistry()).select(config.reward_funcs)
        self.weights = config.reward_weights or [1.0] * len(self.rewards)

    @property
    def iterations(self) -> int:
        """Optimisation passes over each rollout (num_iterations)."""
        return self.config.num_iterations

    def __call__(self, batch: dict, ctx) -> dict:
        cfg, tok, k = self.config, self.tokenizer, self.config.num_generations
        prompts = [ids[mask.bool()].tolist()
                   for ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        phase = ("train", ctx.step) if ctx.training else ("eval",)  # eval samples the same way at every evaluation
        groups = ctx.generator.generate(prompts, n=k, max_new_tokens=cfg.max_completion_length,
                                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                        stop_token_ids=[tok.eos_token_id], seed=mix_seed("rloo", *phase))
        completions = [c for group in groups for c in group]
        stop = {tok.eos_token_id, tok.pad_token_id}
        truncated = torch.tensor([not c or c[-1] not in stop for c in completions])
        prompt_ids, prompt_mask = pad_rows(prompts, tok.pad_token_id, left=True)
        completion_ids, completion_mask = pad_rows(completions, tok.pad_token_id, left=False)
        out = {"prompt_ids": prompt_ids.repeat_interleave(k, 0), "prompt_mask": prompt_mask.repeat_interleave(k, 0),
               "completion_ids": completion_ids, "completion_length": completion_mask.sum(-1),
               "is_truncated": truncated}
        if cfg.mask_truncated_completions:
            completion_mask = completion_mask * (~truncated)[:, None].long()
        out["completion_mask"] = completion_mask
        out.update(self._score(batch, completions))
        out = {key: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for key, v in out.items()}
        if cfg.beta != 0.0 or (self.iterations > 1 and ctx.training):
            with ctx.generator.scoring() as policy:
                old = completion_logps(policy, out, cfg.temperature, cfg.logits_chunk_size)[0]
            if self.iterations > 1 and ctx.training:
                out["old_logps"] = old.sum(-1)
            if cfg.beta != 0.0:
                with ctx.generator.scoring("reference") as reference:
                    ref = completion_logps(reference, out, cfg.temperature, cfg.logits_chunk_size)[0]
                out["kl_sum"] = ((old - ref) * out["completion_mask"]).sum(-1)
        return out

    def _score(self, batch: dict, completions: list[list[int]]) -> dict:
        """Each completion's rewards (per function, and their weighted sum)."""
        k = self.config.num_generations
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        skip = {"prompt_input_ids", "prompt_attention_mask", "prompt"}
        columns = {key: [v for v in values for _ in range(k)] for key, values in batch.items() if key not in skip}
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        per_func = score(self.rewards, prompts, texts, columns)
        return {"rewards": combine(per_func, self.weights), "rewards_per_func": per_func,
                "reward_names": [name for name, _ in self.rewards]}

    def finish(self, batches: list[dict], ctx) -> list[dict]:
        """Advantages once every micro-batch of the step is rolled out: the logged reward std and
        normalize_advantages span all of the step's completions on every process, as TRL's generation batch does
        (at eval, each batch on its own)."""
        cfg, k = self.config, self.config.num_generations
        penalised = []
        for b in batches:
            r = b["rewards"]
            if cfg.reward_clip_range is not None:
                r = r.clamp(*cfg.reward_clip_range)
            penalised.append(r - cfg.beta * b["kl_sum"] if "kl_sum" in b else r)
        advantages = [leave_one_out(r, k) for r in penalised]
        totals = torch.stack([torch.cat([_sums(b["rewards"]) for b in batches]).view(-1, 3).sum(0),
                              torch.cat([_sums(a) for a in advantages]).view(-1, 3).sum(0)])
        if ctx.training:
            totals = ctx.reduce(totals, "sum")
        reward_std = std_from_sums(*totals[0].tolist())
        adv_mean, adv_std = totals[1, 0].item() / max(totals[1, 2].item(), 1.0), std_from_sums(*totals[1].tolist())
        for b, adv, r in zip(batches, advantages, penalised):
            if cfg.normalize_advantages:
                adv = (adv - adv_mean) / (adv_std + 1e-4)
            groups = r.view(-1, k)  # frac_reward_zero_std: as TRL, of the rewards the baseline uses
            count = (~torch.isnan(groups)).sum(1, keepdim=True)
            mean = torch.nanmean(groups, 1, keepdim=True)
            var = torch.nansum((groups - mean) ** 2, 1, keepdim=True) / (count - 1).clamp(min=1)
            group_std = torch.where(count > 1, var, torch.full_like(var, float("nan"))).sqrt()
            b.update(advantages=adv.nan_to_num(0.0).float(), reward_std=torch.full_like(b["rewards"], reward_std),
                     zero_std=torch.isclose(group_std, torch.zeros_like(group_std)).expand_as(groups).reshape(-1))
        return batches

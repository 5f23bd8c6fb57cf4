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

import torch

from alignkit.online.completions import completion_logps
from alignkit.online.groups import GroupRollout, std_from_sums, sums


def leave_one_out(rewards_N: torch.Tensor, k: int) -> torch.Tensor:
    """reward - mean of the other scorable rewards of its group of k (NaN where unscorable or alone)."""
    groups = rewards_N.view(-1, k)
    scorable = (~torch.isnan(groups)).sum(1, keepdim=True)
    total = torch.nansum(groups, 1, keepdim=True)
    return (groups - (total - groups) / (scorable - 1)).reshape(-1)


class RLOORollout(GroupRollout):
    """Built once per run as `RLOORollout(config, tokenizer, rewards=registry)`: the core's group sampling and
    scoring (alignkit.online.groups), the KL to the reference, leave-one-out advantages in `finish`."""

    seed_tag = ("rloo",)

    def __call__(self, batch: dict, ctx) -> dict:
        cfg = self.config
        out = self.sample_and_score(batch, ctx)
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
        n_funcs = batches[0]["rewards_per_func"].shape[1] if batches and "rewards_per_func" in batches[0] else 0
        totals = torch.stack([torch.cat([sums(b["rewards"]) for b in batches]).view(-1, 3).sum(0),
                              torch.cat([sums(a) for a in advantages]).view(-1, 3).sum(0),
                              *(torch.cat([sums(b["rewards_per_func"][:, i]) for b in batches]).view(-1, 3).sum(0)
                                for i in range(n_funcs))])
        if ctx.training:
            totals = ctx.reduce(totals, "sum")
        reward_std = std_from_sums(*totals[0].tolist())
        func_stds = [std_from_sums(*totals[2 + i].tolist()) for i in range(n_funcs)]  # TRL's rewards/<name>/std
        adv_mean, adv_std = totals[1, 0].item() / max(totals[1, 2].item(), 1.0), std_from_sums(*totals[1].tolist())
        for b, adv, r in zip(batches, advantages, penalised):
            if cfg.normalize_advantages:
                adv = (adv - adv_mean) / (adv_std + 1e-4)
            groups = r.view(-1, k)  # frac_reward_zero_std: as TRL, of the rewards the baseline uses
            count = (~torch.isnan(groups)).sum(1, keepdim=True)
            mean = torch.nanmean(groups, 1, keepdim=True)
            var = torch.nansum((groups - mean) ** 2, 1, keepdim=True) / (count - 1).clamp(min=1)
            group_std = torch.where(count > 1, var, torch.full_like(var, float("nan"))).sqrt()
            if n_funcs:
                b["reward_std_per_func"] = torch.tensor(func_stds, dtype=r.dtype, device=r.device).expand(len(r), -1)
            b.update(advantages=adv.nan_to_num(0.0).float(), reward_std=torch.full_like(b["rewards"], reward_std),
                     zero_std=torch.isclose(group_std, torch.zeros_like(group_std)).expand_as(groups).reshape(-1))
        return batches

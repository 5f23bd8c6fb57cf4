"""The rollout stage: sample a group of completions per prompt, score them, and turn rewards into advantages.

The engine calls it without gradient on each micro-batch of prompt rows (from the prompt-only formatter:
`prompt_input_ids` right-padded with `prompt_attention_mask`, `prompt` and the row's other columns as lists)
then `finish` on all of the step's micro-batches (the advantages need the step-wide reward std), and
hands the batches to the reference and the loss:

  prompt_ids / prompt_mask          [N, P] left-padded, N = rows x num_generations (each prompt repeated)
  completion_ids / completion_mask  [N, C] right-padded (mask zero on truncated rows with
                                    mask_truncated_completions)
  advantages [N]; old_logps [N, C] (num_iterations > 1: the policy's log-probs at sampling time, or sampled
                                    ahead: as the rollout's first pass starts)
  rewards [N], rewards_per_func [N, F], reward_names, reward_std [N], zero_std [N],
  reward_std_per_func [N, F] (each function's std over the step), completion_length [N], is_truncated [N]
                                    (for the metrics)
  pixel_values, ... [N, ...]        with a vision-language model's prompt rows with images: each prompt's image
                                    features for each of its completions (every log-prob forward reads them)
"""

import torch

from alignkit.online.completions import completion_logps
from alignkit.online.groups import GroupRollout, std_from_sums, sums
from alignkit_grpo.advantages import EPS, advantages, normalize_then_sum


class GRPORollout(GroupRollout):
    """Built once per run as `GRPORollout(config, tokenizer, rewards=registry)`: the core's group sampling and
    scoring (alignkit.online.groups), log-probs for later passes or a stale sampler, group advantages in `finish`."""

    @property
    def generation_backend(self) -> str:
        """The sampler the engine's generation handle uses (method.generation_backend)."""
        return self.config.generation_backend

    def __call__(self, batch: dict, ctx) -> dict:
        cfg = self.config
        out = self.sample_and_score(batch, ctx)
        if self.iterations > 1 and ctx.training and not cfg.max_staleness:
            out["old_logps"] = completion_logps(ctx.generator.model, out, cfg.temperature, cfg.logits_chunk_size)[0]
        if cfg.max_staleness and ctx.training:  # the sampling copy's log-probs, for the importance weights
            out["sampling_logps"] = completion_logps(ctx.generator.model, out, cfg.temperature,
                                                     cfg.logits_chunk_size)[0]
        return out

    def finish(self, batches: list[dict], ctx) -> list[dict]:
        """Advantages, once every micro-batch of the step is rolled out: the batch std (scale_rewards=batch,
        and the logged reward_std) spans all of the step's completions on every process, as TRL's generation
        batch does (at eval, each batch on its own: processes may hold different numbers of eval batches).
        normalize_then_sum normalises each function's rewards within groups, then their weighted sum over the
        step (mean and std over the same span)."""
        cfg = self.config
        if self.iterations > 1 and cfg.max_staleness and ctx.training:  # sampled ahead: the old log-probs are the
            for b in batches:  # policy's as its first pass starts (here, in the training thread), as TRL's
                b["old_logps"] = completion_logps(ctx.generator.model, b, cfg.temperature, cfg.logits_chunk_size)[0]
        gdpo = cfg.multi_objective_aggregation == "normalize_then_sum"
        if gdpo:
            for b in batches:
                b["aggregated"] = normalize_then_sum(b["rewards_per_func"], cfg.num_generations, self.weights)
        keys = ("rewards", "aggregated") if gdpo else ("rewards",)
        n_funcs = batches[0]["rewards_per_func"].shape[1] if batches and "rewards_per_func" in batches[0] else 0
        totals = torch.zeros(3 * (len(keys) + n_funcs), dtype=torch.float64, device=ctx.device)
        for b in batches:
            per_func = [sums(column) for column in b["rewards_per_func"].unbind(1)] if n_funcs else []
            totals += torch.cat([sums(b[k]) for k in keys] + per_func)
        if ctx.training:
            totals = ctx.reduce(totals, "sum")
        batch_std = std_from_sums(*totals[:3].tolist())
        func_stds = [std_from_sums(*totals[3 * i:3 * i + 3].tolist()) for i in range(len(keys), len(keys) + n_funcs)]
        if gdpo:
            total, _, count = totals[3:6].tolist()
            mean, std = total / count if count else float("nan"), std_from_sums(*totals[3:6].tolist())
        for b in batches:
            if gdpo:
                adv = ((b.pop("aggregated") - mean) / (std + EPS)).nan_to_num(0.0)
                zero = torch.full_like(b["rewards"], std)
            else:
                adv, zero = advantages(b["rewards"], cfg.num_generations, cfg.scale_rewards, batch_std)
            if n_funcs:
                b["reward_std_per_func"] = torch.tensor(func_stds, dtype=b["rewards"].dtype,
                                                        device=b["rewards"].device).expand_as(b["rewards_per_func"]).clone()
            b.update(advantages=adv.float(), reward_std=torch.full_like(b["rewards"], batch_std),
                     zero_std=torch.isclose(zero, torch.zeros_like(zero)))
        return batches

"""Online DPO's rollout: two completions per prompt from the current policy (the core's group sampling,
alignkit.online.groups), ranked by the reward registry, laid out as the DPO loss reads a batch of pairs.

As TRL 1.16's OnlineDPOTrainer: a completion's score is the weighted sum of its reward functions with NaN counted
as 0 (TRL's nansum; a completion no function scored gets 0), less `missing_eos_penalty` when it has no EOS; of a
prompt's two samples the first is chosen when its score is >= the second's (a tie keeps the first); prompt +
completion are cut from the left to `max_length` tokens (the prompt's columns, the completion whole).

The batch, [chosen rows; rejected rows] as the DPO loss's:
  input_ids / attention_mask / labels  [2n, P + C] left-padded prompt + right-padded completion; labels are the
                                       completion's tokens, -100 elsewhere
  scores [2n] (the ranking's scores), rewards [2n] (the weighted sum, NaN where no function applied),
  contain_eos [2n], completion_length [2n], rewards_per_func [2n, F], reward_names   (for the metrics)
"""

import torch

from alignkit import ConfigError
from alignkit.online.groups import GroupRollout

IGNORE = -100


def rank_pairs(rewards_N: torch.Tensor, contain_eos_N: torch.Tensor, missing_eos_penalty: float | None):
    """(scores [N], order [N]) of 2-sample groups (rows 2g and 2g + 1): `order` indexes the chosen rows, then the
    rejected rows, of each group."""
    scores = rewards_N.nan_to_num(0.0)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~contain_eos_N).to(scores.dtype)
    first, second = scores[0::2], scores[1::2]
    keep_first = (first >= second).long()
    base = torch.arange(len(first), device=scores.device) * 2
    return scores, torch.cat([base + 1 - keep_first, base + keep_first])


def pair_batch(out: dict, scores: torch.Tensor, order: torch.Tensor, max_length: int) -> dict:
    """The rolled-out completions as DPO rows in `order`, cut from the left to `max_length` columns."""
    prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
    completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
    # multi-turn episodes: environment tokens are read (attention) but not trained (labels)
    completion_attention = out.get("completion_attention_mask", completion_mask)
    cut = max(prompt_ids.shape[1] + completion_ids.shape[1] - max_length, 0)
    prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE), completion_ids.masked_fill(~completion_mask.bool(),
                                                                                        IGNORE)], 1)
    return {"input_ids": torch.cat([prompt_ids, completion_ids], 1)[order],
            "attention_mask": torch.cat([prompt_mask, completion_attention], 1)[order], "labels": labels[order],
            "scores": scores[order], "rewards": out["rewards"][order], "contain_eos": ~out["is_truncated"][order],
            "completion_length": out["completion_length"][order], "rewards_per_func": out["rewards_per_func"][order],
            "reward_names": out["reward_names"]}


class OnlineDPORollout(GroupRollout):
    """Built once per run as `OnlineDPORollout(config, tokenizer, rewards=registry)`."""

    seed_tag = ("online-dpo",)

    def __init__(self, config, tokenizer, rewards=None) -> None:
        self.judge = None  # method.judge: loaded at the first step, with the run's rewards: block's templates
        self.rewards_settings = getattr(rewards, "settings", None)
        if not config.reward_funcs and not config.judge:
            known = ", ".join(sorted(rewards.functions)) if rewards is not None else "none"
            raise ConfigError("method.reward_funcs is empty: Online DPO ranks its two samples per prompt by reward; "
                              f"give reward functions by name (registered: {known}) or model:PATH, or a pairwise "
                              "judge (method.judge=judge:MODEL)")
        super().__init__(config, tokenizer, rewards=rewards)

    def __call__(self, batch: dict, ctx) -> dict:
        out = self.sample_and_score(batch, ctx)
        if self.config.judge:  # as TRL: the judge's pick decides; missing_eos_penalty applies to reward scores only
            scores, order = rank_pairs(self.judged(batch, out), ~out["is_truncated"], None)
        else:
            scores, order = rank_pairs(out["rewards"], ~out["is_truncated"], self.config.missing_eos_penalty)
        return pair_batch(out, scores, order, self.config.max_length)

    def judged(self, batch: dict, out: dict) -> torch.Tensor:
        """[N] the judge's probability that each sample is the better of its pair (first: p, second: 1 - p)."""
        from alignkit.online import Judge

        if self.judge is None:
            settings = self.rewards_settings
            self.judge = Judge.load(self.config.judge.removeprefix("judge:").removeprefix("model:"),
                                    getattr(settings, "judge_template", None),
                                    getattr(settings, "judge_pairwise_template", None))
        texts = self.tokenizer.batch_decode([ids[mask.bool()].tolist() for ids, mask in
                                             zip(out["completion_ids"], out["completion_mask"])],
                                            skip_special_tokens=True)
        first = torch.tensor(self.judge.compare(list(batch["prompt"]), texts[0::2], texts[1::2]),
                             dtype=torch.float32, device=out["completion_ids"].device)
        return torch.stack([first, 1 - first], 1).reshape(-1)

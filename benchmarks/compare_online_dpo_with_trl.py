"""alignkit's Online DPO against TRL 1.16's experimental OnlineDPOTrainer, on the same fixed completions and reward
functions: the ranking (chosen/rejected), loss, metrics and one step's gradients.

TRL runs its own `training_step` (its `_generate` is replaced by one returning fixed prompt and completion ids:
sampling differs by design), which scores the completions with its reward functions, ranks them, computes the
reference's and the policy's log-probs and backpropagates the loss; alignkit runs its rollout stage
(`OnlineDPORollout`, with a stand-in generation handle returning the same completions), the DPO loss's reference
outputs and `OnlineDPOLoss`, normalised by its counts as the engine does. Both sides load the same tiny model; the
policy is moved away from its reference first (so the log-ratios are not zero). Two reward functions with weights,
one returning None for a whole prompt (TRL's nansum: counted as 0), rewards that tie within some pairs (the first
sample is then chosen); rows of different lengths, one cut at max_new_tokens with no EOS (missing_eos_penalty).
Standard and conversational prompts; the policy's initial copy or another model as the reference; sigmoid and
OnlineDPOTrainer's ipo; a max_length that cuts the prompts' first columns.

    pip install -e ".[bench]" -e plugins/alignkit-dpo
    python benchmarks/compare_online_dpo_with_trl.py            # prints a table; exit 1 on any mismatch
"""

import argparse
import contextlib
import copy
import json
import sys
import tempfile

import torch
from alignkit_dpo.online import OnlineDPOConfig, OnlineDPOLoss
from alignkit_dpo.online_rollout import OnlineDPORollout
from datasets import Dataset

from alignkit.formatters import PromptOnlyFormatter
from alignkit.online import RewardRegistry
from alignkit.testing import tiny_model, tiny_tokenizer

TOL = 1e-5
MAX_NEW = 7
TEXTS = ["sort: 3 1 2 =", "sort: 9 8 7 6 5 =", "sort: 4 4 1 =", "sort: 2 7 ="]
ANSWERS = ["x", "skip", "y", "z"]
#: TRL's objective/kl, /entropy, /non_score_reward and /rlhf_reward also sum the log-probs of the padding after each
#: completion's EOS (its _forward does not mask them); alignkit's count the completion tokens only: not compared
METRICS = ("objective/scores", "objective/scores_margin", "val/contain_eos_token", "logps/chosen", "logps/rejected",
           "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "beta")


def _text(c):
    return c if isinstance(c, str) else c[-1]["content"]  # TRL hands conversational completions as messages


def reward_a(prompts, completions, **kw):
    """Completion length in characters, mod 3 (ties within some pairs)."""
    return [float(len(_text(c)) % 3) for c in completions]


def reward_b(prompts, completions, answer=None, **kw):
    """None for rows whose answer is "skip"; else 1.0 for an even number of characters."""
    return [None if a == "skip" else float(len(_text(c)) % 2 == 0) for c, a in zip(completions, answer)]


def completions(tok, seed: int = 0) -> list[list[int]]:
    """2 completions per prompt (rows 2g, 2g + 1), different lengths, each ending in EOS but row 0 (cut at MAX_NEW)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(len(TEXTS) * 2):
        n = MAX_NEW if r == 0 else int(torch.randint(2, MAX_NEW + 1, (1,), generator=g))
        ids = torch.randint(4, len(tok), (n,), generator=g).tolist()
        rows.append(ids if r == 0 else ids[:-1] + [tok.eos_token_id])
    return rows


def perturb(model, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def pad(rows, value, left):
    width = max(map(len, rows))
    ids = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


def run_case(path: str, tok, tmp: str, case: dict) -> dict:
    from trl.experimental.online_dpo import OnlineDPOConfig as TRLConfig
    from trl.experimental.online_dpo import OnlineDPOTrainer

    funcs = case.get("funcs", ["reward_a", "reward_b"])
    weights = case.get("weights", [1.0, 0.5][:len(funcs)])
    cfg = OnlineDPOConfig(beta=case.get("beta", 0.1), loss_type=case.get("loss", "sigmoid"), max_new_tokens=MAX_NEW,
                          max_length=case.get("max_length", 512), missing_eos_penalty=case.get("eos_penalty"),
                          reward_funcs=funcs, reward_weights=weights)
    chat = case.get("chat", False)
    prompts = [[{"role": "user", "content": t}] for t in TEXTS] if chat else TEXTS
    fixed = completions(tok)
    args = TRLConfig(output_dir=tmp, beta=[cfg.beta], loss_type=cfg.loss_type[0], max_new_tokens=MAX_NEW,
                     max_length=cfg.max_length, missing_eos_penalty=cfg.missing_eos_penalty, reward_weights=weights,
                     per_device_train_batch_size=len(TEXTS), report_to=[], use_cpu=True, bf16=False,
                     logging_steps=1, gradient_checkpointing=False)
    table = {"reward_a": reward_a, "reward_b": reward_b}
    trl_ref = tiny_model(seed=7) if case.get("separate_ref") else None
    with contextlib.redirect_stderr(sys.stdout), _quiet_warnings():
        trainer = OnlineDPOTrainer(model=path, ref_model=trl_ref, reward_funcs=[table[f] for f in funcs], args=args,
                                   processing_class=tok,
                                   train_dataset=Dataset.from_list([{"prompt": prompts[0], "answer": "x"}] * 8))
    policy = trainer.model
    ours = tiny_model()
    ours.load_state_dict(policy.state_dict())
    reference = copy.deepcopy(trl_ref if trl_ref is not None else ours).eval()
    for m in (policy, ours):
        perturb(m, 0.02, seed=1)  # the policy has moved away from its reference
        m.train()

    formatter = PromptOnlyFormatter(PromptOnlyFormatter.config_class(name="online-dpo"), tok)
    ids = [formatter.prompt_ids(p) for p in prompts]

    # ---- TRL: its training step on the fixed completions (rows: every prompt's first sample, then the seconds) ----
    prompt_ids, prompt_mask = pad(ids, tok.pad_token_id, left=True)
    trl_rows = fixed[0::2] + fixed[1::2]
    completion_ids, completion_mask = pad(trl_rows, tok.pad_token_id, left=False)
    trainer._generate = lambda model, prompts, images=None: (prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1),
                                                              completion_ids, completion_mask, None)
    trl_loss = trainer.training_step(policy, {"prompt": list(prompts), "answer": list(ANSWERS)}).item()
    trl_metrics = {k: v[-1] for k, v in trainer.stats.items() if v}

    # ---- alignkit: the rollout stage on the same completions, the reference, the loss ----
    registry = RewardRegistry()
    for f in funcs:
        registry.add(f, table[f])
    rollout = OnlineDPORollout(cfg, tok, rewards=registry)

    class Handle:
        def generate(self, prompt_ids, n, **kw):
            return [fixed[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    class Ctx:
        generator, training, step, device = Handle(), True, 0, torch.device("cpu")

    width = max(map(len, ids))
    batch = {"prompt_input_ids": torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids]),
             "prompt_attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
             "prompt": prompts, "answer": ANSWERS}
    with torch.no_grad():
        mine = rollout(batch, ctx=Ctx)
    loss_fn = OnlineDPOLoss(cfg)
    loss_fn.prepare_model(ours)
    with torch.no_grad():
        ref = loss_fn.reference(reference, mine)
    out = loss_fn(ours, mine, ref)
    counts = {u: float(c) for u, c in loss_fn.counts(mine).items()}
    our_loss = out.normalized(counts)
    our_loss.backward()
    theirs_params = dict(policy.named_parameters())
    grad_worst = max(float((p.grad - theirs_params[n].grad).abs().max()
                           / theirs_params[n].grad.abs().max().clamp(min=1e-12)) for n, p in ours.named_parameters())
    metrics = {k: (float(v[0]) / max(float(v[1]), 1.0) if isinstance(v, tuple) else float(v))
               for k, v in out.metrics.items()}
    compared = {k: (metrics[k], trl_metrics[k]) for k in METRICS if k in metrics and k in trl_metrics}
    # relative to the TRL value, at least 0.1: rewards/* are beta x differences of two log-prob sums near -20, small
    # after the cancellation; their float32 rounding (about 4e-7 absolute) is not a difference of method
    metric_worst = max(abs(a - b) / max(abs(b), 0.1) for a, b in compared.values())
    return {**{k: case.get(k, False) for k in ("chat", "loss", "separate_ref", "eos_penalty", "max_length")},
            "metrics_rel_max": metric_worst, "metrics_compared": sorted(compared), "alignkit_loss": our_loss.item(),
            "trl_loss": trl_loss, "loss_rel": abs(our_loss.item() - trl_loss) / max(abs(trl_loss), 1e-6),
            "grad_rel_max": grad_worst}


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


CASES = {
    "sigmoid": {},
    "sigmoid-eos-penalty": {"eos_penalty": 1.0},
    "ipo": {"loss": "ipo", "beta": 0.5},
    "separate-ref": {"separate_ref": True},
    "nan-rewards-only": {"funcs": ["reward_b"], "weights": None},
    "max-length-cut": {"max_length": 12},
    "chat-sigmoid-eos-penalty": {"chat": True, "eos_penalty": 1.0},
    "chat-ipo-separate-ref": {"chat": True, "loss": "ipo", "beta": 0.5, "separate_ref": True},
}


def compare(names=None) -> list[dict]:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model().save_pretrained(f"{tmp}/model")
        tok.save_pretrained(f"{tmp}/model")
        for name in names or CASES:
            out.append({"case": name, **run_case(f"{tmp}/model", tok, f"{tmp}/trl-{name}", CASES[name])})
    return out


def worst(row: dict) -> float:
    return max(row["metrics_rel_max"], row["loss_rel"], row["grad_rel_max"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = compare()
    print(f"{'case':26} {'alignkit loss':>14} {'TRL loss':>14} {'loss rel':>9} {'grad rel':>9} {'metric rel':>10}")
    for r in rows:
        print(f"{r['case']:26} {r['alignkit_loss']:14.8f} {r['trl_loss']:14.8f} {r['loss_rel']:9.1e} "
              f"{r['grad_rel_max']:9.1e} {r['metrics_rel_max']:10.1e}")
    print("metrics compared:", ", ".join(rows[0]["metrics_compared"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if worst(r) > TOL]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases within {TOL:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""RLOO maths against hand-worked float64 references: the leave-one-out baseline (with an unscorable completion),
the KL in the reward, the sequence-level clipped surrogate, and the fused head against the checkpointed path."""

import math
from types import SimpleNamespace

import pytest
import torch
from alignkit_rloo.config import RLOOConfig
from alignkit_rloo.loss import RLOOLoss
from alignkit_rloo.rollout import RLOORollout, leave_one_out

from alignkit.online import RewardRegistry, exact_match
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import refused


def registry() -> RewardRegistry:
    r = RewardRegistry()
    r.add("exact-match", exact_match)
    return r


def test_leave_one_out_baseline_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0, 4.0, float("nan"), 1.0], dtype=torch.float64)  # groups of 3
    adv = leave_one_out(rewards, 3)
    assert adv[:3].tolist() == pytest.approx([1 - 1.0, 0 - 1.5, 2 - 0.5], rel=1e-12)
    # the unscorable completion is no one's sibling: the others' baseline is the remaining one
    assert adv[3].item() == pytest.approx(3.0) and adv[5].item() == pytest.approx(-3.0)
    assert math.isnan(adv[4].item())


class Ctx:
    training, step, device = True, 0, torch.device("cpu")

    @staticmethod
    def reduce(t, op="sum"):
        return t


def test_finish_subtracts_beta_times_the_summed_kl_then_takes_the_baseline_and_normalises():
    cfg = RLOOConfig(num_generations=2, beta=0.5, normalize_advantages=True, reward_clip_range=(0.0, 2.0))
    rollout = RLOORollout(cfg, tiny_tokenizer(), rewards=registry())
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.5])
    kl = torch.tensor([0.2, -0.4, 1.0, 0.0])
    batch = {"rewards": rewards, "kl_sum": kl}
    out = rollout.finish([batch], ctx=Ctx)[0]
    r = [min(2.0, 3.0) - 0.1, 1.0 + 0.2, 0.0 - 0.5, 0.5]
    adv = [r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]]
    mean = sum(adv) / 4
    std = math.sqrt(sum((a - mean) ** 2 for a in adv) / 3)
    assert out["advantages"].tolist() == pytest.approx([(a - mean) / (std + 1e-4) for a in adv], rel=1e-6)
    assert out["reward_std"][0].item() == pytest.approx(float(rewards.std()), rel=1e-6)  # of the raw rewards


def batch_of(g, old=False):
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 4, 5, 6], [0, 4, 5, 6]])
    batch = {"prompt_ids": prompt, "prompt_mask": (prompt != 0).long(),
             "completion_ids": torch.randint(3, 300, (4, 5), generator=g),
             "completion_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]),
             "advantages": torch.tensor([0.8, -1.1, 0.3, 0.5])}
    if old:
        batch["old_logps"] = torch.tensor([-9.0, -30.0, -14.0, 0.0])
    return batch


def test_sequence_clipped_surrogate_by_hand_in_float64():
    g = torch.Generator().manual_seed(2)
    batch = batch_of(g, old=True)
    cfg = RLOOConfig(temperature=0.7, epsilon=0.2, epsilon_high=0.3)
    model = tiny_model(seed=3)
    loss = RLOOLoss(cfg)
    loss.prepare_model(model)
    loss.head = None  # the plain (checkpointed) path; the fused one is checked against it below
    with torch.no_grad():
        out = loss(model, batch)
        logits = model.double()(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                                attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits
    logp = torch.log_softmax(logits[:, 3:-1] / 0.7, -1).gather(-1, batch["completion_ids"][..., None])[..., 0]
    seq = (logp * batch["completion_mask"]).sum(-1)
    expected = 0.0
    for s, o, a in zip(seq.tolist(), batch["old_logps"].tolist(), batch["advantages"].tolist()):
        ratio = math.exp(s - o)
        expected += -min(ratio * a, min(max(ratio, 0.8), 1.3) * a)
    assert out.terms["completions"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.counts(batch) == {"completions": 4}


@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_fused_head_equals_the_checkpointed_path(with_old, lora):
    """Training runs the fused head (fused_row_terms: the head's gradients computed in the forward): the loss, the
    metrics and every gradient equal the checkpointed chunks', with a completion that has no counted token."""
    results = []
    for fused in (True, False):
        batch = batch_of(torch.Generator().manual_seed(2), with_old)
        model = tiny_model(seed=3, tie_word_embeddings=False)
        if lora:
            import peft

            torch.manual_seed(0)
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                               init_lora_weights=False))
        loss = RLOOLoss(RLOOConfig(temperature=0.7, logits_chunk_size=3, epsilon_high=0.3))
        loss.prepare_model(model)
        if not fused:
            loss.head = None
        out = loss(model, batch)
        out.terms["completions"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.terms["completions"].item(), {k: float(v[0]) for k, v in out.metrics.items()}, grads))
    (term_a, metrics_a, grads_a), (term_b, metrics_b, grads_b) = results
    assert term_a == pytest.approx(term_b, rel=1e-5, abs=1e-6)
    assert metrics_a == pytest.approx(metrics_b, rel=1e-5, abs=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_b:
        error = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2e}"


def test_beta_zero_loads_no_reference_and_beta_scores_the_reference_in_the_rollout():
    assert not RLOOLoss(RLOOConfig(beta=0.0)).needs_reference_model
    loss = RLOOLoss(RLOOConfig())
    assert loss.needs_reference_model and RLOOConfig().beta == 0.05  # TRL 1.16's default
    assert loss.reference(None, {}) == {}  # nothing per micro-batch: the KL is in the rewards


def test_fewer_than_two_completions_per_prompt_is_one_line_exit_2_and_writes_nothing(tmp_path):
    line = refused("run", "--method", "rloo", "method.num_generations=1", f"train.output_dir={tmp_path / 'out'}",
                   written=tmp_path / "out")
    assert line == ("alignkit: error: method.num_generations: RLOO's leave-one-out baseline needs at least 2 "
                    "completions per prompt; set it to 2 or more (got 1)")


def test_an_inverted_reward_clip_range_is_one_line_exit_2(tmp_path):
    line = refused("run", "--method", "rloo", "method.reward_clip_range=[2,1]", f"train.output_dir={tmp_path / 'o'}",
                   written=tmp_path / "o")
    assert "method.reward_clip_range" in line and "min <= max" in line


def test_rollout_scores_policy_and_reference_once_and_stores_what_later_passes_need():
    """With beta > 0 the rollout asks the generation handle for the policy and the reference to score with;
    num_iterations > 1 keeps each completion's summed log-prob at sampling time."""
    tok = tiny_tokenizer()
    policy, reference = tiny_model(seed=1), tiny_model(seed=2)
    asked = []

    class Gen:
        def generate(self, prompts, n, **kw):
            return [[[5, 6, tok.eos_token_id], [7, 8, 9]] for _ in prompts]

        def scoring(self, name="policy"):
            asked.append(name)
            import contextlib

            return contextlib.nullcontext(policy if name == "policy" else reference)

    ctx = SimpleNamespace(generator=Gen(), training=True, step=0, device=torch.device("cpu"),
                          reduce=lambda t, op="sum": t)
    cfg = RLOOConfig(num_generations=2, beta=0.1, num_iterations=2, max_completion_length=3)
    rollout = RLOORollout(cfg, tok, rewards=registry())
    ids = tok("sort: 2 1 =")["input_ids"]
    batch = {"prompt_input_ids": torch.tensor([ids]), "prompt_attention_mask": torch.ones(1, len(ids)).long(),
             "prompt": ["sort: 2 1 ="], "answer": [" 1 2"]}
    out = rollout.finish([rollout(batch, ctx=ctx)], ctx=ctx)[0]
    assert asked == ["policy", "reference"]
    assert out["is_truncated"].tolist() == [False, True]
    with torch.no_grad():
        full = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        lp = {}
        for name, m in (("policy", policy), ("reference", reference)):
            logits = m(input_ids=full, attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], 1)).logits
            tok_lp = torch.log_softmax(logits[:, len(ids) - 1:-1].double(), -1).gather(
                -1, out["completion_ids"][..., None])[..., 0]
            lp[name] = (tok_lp * out["completion_mask"]).sum(-1)
    assert out["old_logps"].tolist() == pytest.approx(lp["policy"].tolist(), rel=1e-5)
    assert out["kl_sum"].tolist() == pytest.approx((lp["policy"] - lp["reference"]).tolist(), rel=1e-4, abs=1e-5)


def test_the_generation_handle_scores_the_implicit_lora_reference_with_its_adapters_off():
    """Generator.scoring("reference") on a LoRA policy with no explicit reference: the base model's logits; the
    policy's own scoring keeps the adapters."""
    import peft
    from accelerate import Accelerator

    from alignkit.online import Generator

    ids = torch.tensor([[5, 6, 7, 8]])
    base = tiny_model(seed=4)
    with torch.no_grad():
        expected = base(input_ids=ids).logits.clone()
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    gen = Generator(model, Accelerator(cpu=True), tiny_tokenizer(), seed=0)
    gen.add_model("reference", model, adapters_off=True)
    with torch.no_grad():
        with gen.scoring("reference") as ref:
            off = ref(input_ids=ids).logits
        with gen.scoring() as policy:
            on = policy(input_ids=ids).logits
    assert torch.allclose(off, expected, atol=1e-6)
    assert not torch.allclose(on, expected, atol=1e-3)


def test_a_reward_model_path_that_is_not_a_classifier_is_one_line_exit_2_and_writes_nothing(tmp_path):
    """model:PATH naming a causal LM (no classification head: it would score with a random one) is refused."""
    tiny_model().save_pretrained(tmp_path / "causal")
    tiny_tokenizer().save_pretrained(tmp_path / "causal")
    line = refused("run", "--method", "rloo", f"method.reward_funcs=[model:{tmp_path / 'causal'}]",
                   f"train.output_dir={tmp_path / 'out'}", written=tmp_path / "out")
    assert line.startswith(f"alignkit: error: method.reward_funcs: model:{tmp_path / 'causal'} is a LlamaForCausalLM, "
                           "not a sequence classifier"), line


def test_each_reward_functions_std_over_the_step_is_logged_as_trl_does():
    """TRL's rewards/<name>/std: each function's (unbiased) std over the step's completions, every micro-batch."""
    from alignkit_rloo.loss import rollout_metrics

    cfg = RLOOConfig(num_generations=2)
    rollout = RLOORollout(cfg, tiny_tokenizer(), rewards=registry())
    per_func = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 4.0], [1.0, 0.5]])]
    batches = [{"rewards": p.sum(1), "rewards_per_func": p, "reward_names": ["a", "b"],
                "completion_length": torch.tensor([3, 4]), "is_truncated": torch.tensor([False, False])}
               for p in per_func]
    ctx = SimpleNamespace(training=True, reduce=lambda t, op="sum": t)
    out = rollout.finish(batches, ctx=ctx)
    column = torch.cat(per_func)
    for b in out:
        metrics = rollout_metrics(b)
        for i, name in enumerate(["a", "b"]):
            total, n = metrics[f"rewards/{name}/std"]
            assert float(total) / n == pytest.approx(column[:, i].std().item(), rel=1e-6)

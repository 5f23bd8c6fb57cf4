"""TRL 1.16 DPOTrainer's loss family in the dpo plugin: the settings refused in one line, the loss written out by hand
for MPO + LD-DPO + WPO, every loss type against TRL itself (a few cases each suite run) and learning on the demo."""

import math

import alignkit_dpo
import pytest
import torch
from alignkit_dpo.losses import LOSSES

import alignkit
from helpers import ROOT, FixedLogits, fast, read_jsonl, refused

TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def test_the_loss_types_are_trls():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert all(f"'{t}'" in help_text for t in TRL_LOSS_TYPES)
    assert list(LOSSES) == TRL_LOSS_TYPES


@pytest.mark.parametrize("args, needle", [
    (["method.loss_type=dpo_typo"], "method.loss_type: 'dpo_typo' is not a loss type of TRL 1.16's DPO; choose from "
                                    "sigmoid, hinge"),
    (["method.loss_type=[sigmoid,sft]", "method.loss_weights=[1.0]"], "method.loss_weights: 1 weights for 2"),
    (["method.loss_type=exo_pair"], "method.label_smoothing must be > 0 for loss_type exo_pair"),
    (["method.label_smoothing=0.1"], "method.label_smoothing is read only by loss types aot, aot_unpaired"),
    (["method.loss_type=nca_pair", "method.f_divergence_type=js_divergence"],
     "method.f_divergence_type=js_divergence works only with"),
    (["method.loss_type=aot", "method.use_weighting=true"], "method.use_weighting: aot and aot_unpaired sort"),
    (["method.loss_type=[sigmoid,sft]", "method.use_weighting=true"], "method.use_weighting does not apply to"),
    (["method.sync_ref_model=true", "method.precompute_ref_log_probs=true"], "method.sync_ref_model updates"),
])
def test_mistakes_are_one_line_before_any_write(tmp_path, args, needle):
    out = tmp_path / "out"
    line = refused("run", "--method", "dpo", f"train.output_dir={out}", *args, written=out)
    assert needle in line


def logps_by_hand(logits, labels):
    """Per row, the list of log p(label) of its labelled tokens, in float64."""
    logp = torch.log_softmax(logits.double(), -1)
    return [[logp[i, t - 1, labels[i, t]] for t in range(1, labels.shape[1]) if labels[i, t] != -100]
            for i in range(labels.shape[0])]


@pytest.mark.parametrize("wpo", [False, True])
def test_mpo_with_ld_alpha_and_wpo_by_hand(wpo):
    """loss_type [sigmoid, bco_pair(, sft)] with weights and ld_alpha, with or without use_weighting (which TRL does
    not apply with sft), written out from the paper formulas on answers of different lengths."""
    ids = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 5, 8, 2, 0, 0], [1, 5, 9, 2, 0, 0], [1, 5, 3, 4, 6, 2]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    torch.manual_seed(4)
    policy, reference = torch.randn(4, 6, 11), torch.randn(4, 6, 11)
    beta, a, w = 0.3, 0.4, [0.7, 0.2, 1.5]
    types = ["sigmoid", "bco_pair"] + ([] if wpo else ["sft"])
    config = alignkit_dpo.DPOConfig(beta=beta, loss_type=types, loss_weights=w[:len(types)], ld_alpha=a,
                                    use_weighting=wpo)
    object.__setattr__(config, "label_pad_token_id", -100)
    loss = alignkit_dpo.DPOLoss(config)
    pol, ref = logps_by_hand(policy, labels), logps_by_hand(reference, labels)

    def ld(rows, i, j):  # LD-DPO: the tokens past the shorter answer of the pair weigh `a`
        shared = min(len(rows[i]), len(rows[j]))
        return sum(rows[i][:shared]) + a * sum(rows[i][shared:])

    logp = torch.log_softmax(policy.double(), -1)
    sq = torch.logsumexp(2 * logp, -1)  # log sum_v p_v^2 per position
    answer = [[t for t in range(1, 6) if labels[i, t] != -100] for i in range(4)]
    wpo_weights = [math.exp(sum(float(logp[i, t - 1, labels[i, t]] - sq[i, t - 1]) for t in answer[i]) / len(answer[i]))
                   for i in range(4)]
    chosen_tokens = pol[0] + pol[1]
    sft = -sum(chosen_tokens) / len(chosen_tokens)
    per_pair = []
    for k in range(2):
        c, r = ld(pol, k, k + 2) - ld(ref, k, k + 2), ld(pol, k + 2, k) - ld(ref, k + 2, k)
        sigmoid = -math.log(1 / (1 + math.exp(-beta * (c - r))))
        bco = -math.log(1 / (1 + math.exp(-beta * c))) - math.log(1 / (1 + math.exp(beta * r)))
        weight = wpo_weights[k] * wpo_weights[k + 2] if wpo else 1.0
        per_pair.append((w[0] * sigmoid + w[1] * bco) * weight + (0 if wpo else w[2] * float(sft)))
    out = loss(FixedLogits(policy), batch, ref=loss.reference(FixedLogits(reference), batch))
    got = out.normalized({u: float(n) for u, n in loss.counts(batch).items()})
    assert float(got.detach()) == pytest.approx(float(sum(per_pair) / 2), rel=1e-5)
    assert float(out.metrics["rewards/chosen"]) == pytest.approx(
        float(beta * sum(ld(pol, k, k + 2) - ld(ref, k, k + 2) for k in range(2)) / 2), rel=1e-5)


def test_eval_metrics_and_gradients_equal_trl(tmp_path, monkeypatch):
    """TRL 1.16's DPOTrainer run for real on a few cases of benchmarks/compare_dpo_with_trl.py: several loss types,
    MPO, LD-DPO, WPO, conversational data and an implicit reference; eval metrics and one step's gradients."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_dpo_with_trl as cmp

    cases = ("ipo", "aot", "mpo", "ld_alpha", "use_weighting-mpo", "sigmoid-conversational", "sigmoid-implicit-ref")
    monkeypatch.setattr(cmp, "CASES", {k: cmp.CASES[k] for k in cases})
    monkeypatch.setattr(cmp, "GRADIENT_CASES", ("aot", "mpo", "use_weighting-mpo", "sigmoid-conversational"))
    cmp.make_inputs(tmp_path)
    _, worst, _ = cmp.compare(cmp.alignkit_side(tmp_path), cmp.trl_side(tmp_path))
    assert worst <= 1e-5
    _, grad_worst = cmp.compare_gradients(tmp_path)
    assert grad_worst <= 1e-5


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_each_loss_type_learns_the_demo(tmp_path, loss_type):
    """A short run on builtin:sort per loss type: the held-out reward accuracy rises. sft alone is no preference loss
    (MPO's sft + sigmoid here); apo_down lowers both answers (beta 0.5 lets the margin grow within 10 steps); DiscoPOP
    at its default tau 0.05 pushes a zero margin negative (its loss falls for z < 0 near 0), tau 1 does not."""
    settings = fast(tmp_path, max_steps=10, learning_rate=3e-3, eval_on_start=True, eval_steps=10)
    settings["method"] = {"loss_type": [loss_type, "sigmoid"] if loss_type == "sft" else [loss_type],
                          "label_smoothing": 0.1 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0,
                          **{"apo_down": {"beta": 0.5}, "discopop": {"discopop_tau": 1.0}}.get(loss_type, {})}
    alignkit.run("dpo", settings)
    evals = [m for m in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "eval_rewards/accuracies" in m]
    first, last = evals[0]["eval_rewards/accuracies"], evals[-1]["eval_rewards/accuracies"]
    assert last >= 0.75 and last > first, (first, last)


def test_a_loss_type_listed_twice_counts_twice(tmp_path):
    """As TRL sums over the list: [sigmoid, sigmoid] with weights [0.3, 0.9] is 1.2 x sigmoid (and sft likewise)."""
    from helpers import two_pairs

    batch = two_pairs()
    torch.manual_seed(5)
    policy, reference = torch.randn(4, 5, 11), torch.randn(4, 5, 11)

    def loss_of(**settings):
        config = alignkit_dpo.DPOConfig(**settings)
        object.__setattr__(config, "label_pad_token_id", -100)
        loss = alignkit_dpo.DPOLoss(config)
        out = loss(FixedLogits(policy), batch, ref=loss.reference(FixedLogits(reference), batch))
        return float(out.normalized({u: float(n) for u, n in loss.counts(batch).items()}).detach())

    assert loss_of(loss_type=["sigmoid", "sigmoid"], loss_weights=[0.3, 0.9]) == pytest.approx(
        1.2 * loss_of(loss_type="sigmoid"), rel=1e-6)
    assert loss_of(loss_type=["sft", "sft"], loss_weights=[0.5, 1.0]) == pytest.approx(
        1.5 * loss_of(loss_type="sft"), rel=1e-6)

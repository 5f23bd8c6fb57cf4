"""(sum, count) metrics and eval_loss over the whole eval set: exact whatever the batching."""

import pytest
import torch

import alignkit
import alignkit_orpo
from alignkit import hookimpl, load_config
from alignkit.engine.loop import Engine
from alignkit.engine.metrics import MetricSums
from alignkit.testing import plugin_manager
from helpers import fast, read_jsonl
from toy_method import ToyLoss, ToyPlugin


def toy_pm(*extra):
    return plugin_manager(alignkit_orpo, ToyPlugin(), *extra)


def test_metric_sums_add_pairs_exactly_and_average_plain_tensors_per_batch():
    sums = MetricSums(torch.device("cpu"))
    sums.add({"pair": (torch.tensor(3.0), 2), "plain": torch.tensor(1.0)})
    sums.add({"pair": (torch.tensor(1.0), torch.tensor(6))})  # "plain" absent: still one of two batches
    assert sums.totals() == {"pair": (4.0, 8.0), "plain": (1.0, 2.0)}
    with pytest.raises(ValueError, match="a pair is \\(sum, count\\)"):
        sums.add({"bad": (1, 2, 3)})


def test_a_pair_metric_on_some_micro_batches_logs_its_exact_mean(tmp_path):
    """The probe is 1.0 whenever present (first micro-batch of each step): logged 1.0 as a pair. As a plain
    tensor it is averaged over every micro-batch (the mean of micro-batch means, as TRL): 0.5."""
    steps = []

    class Steps:
        @hookimpl
        def on_step_end(self, run, step, metrics):
            steps.append(metrics)

    result = alignkit.run("toy", fast(tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=2,
                                      gradient_accumulation_steps=2), plugins=toy_pm(Steps()))
    logs = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert len(logs) == 2 and len(steps) == 4
    for row in logs:
        assert row["probe"] == 1.0 and row["probe_plain"] == 0.5
    assert all(m["probe"] == 1.0 and m["probe_plain"] == 0.5 for m in steps)


def test_window_pair_metrics_are_total_sum_over_total_count(tmp_path):
    steps = []

    class Totals:
        @hookimpl
        def on_step_end(self, run, step, metrics):
            steps.append(metrics)

    result = alignkit.run("toy", fast(tmp_path, max_steps=2, logging_steps=2, per_device_train_batch_size=3),
                          plugins=toy_pm(Totals()))
    logged = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r][0]
    # loss is the per-token NLL normalised over each step: the window's pooled token_nll weights steps by
    # their tokens, so it lies between the two steps' values and equals neither unweighted mean exactly.
    assert min(m["token_nll"] for m in steps) <= logged["token_nll"] <= max(m["token_nll"] for m in steps)
    assert logged["loss"] == pytest.approx(sum(m["loss"] for m in steps) / 2, rel=1e-9)
    for m in steps:
        assert m["token_nll"] == pytest.approx(m["loss"], rel=1e-6)  # one micro-batch: the same quantity


def eval_with_batch_size(tmp_path, size: int, per_batch: bool = False) -> dict:
    pm = toy_pm()
    cfg, method = load_config("toy", fast(tmp_path / str(size), per_device_eval_batch_size=size),
                              {"data.max_eval_samples": 10, "method.eval_loss_per_batch": per_batch}, plugins=pm)
    return Engine(cfg, method, pm).evaluate()


def float64_reference(tmp_path) -> tuple[float, float]:
    """Total NLL / total labelled tokens of the eval set, one example at a time in float64."""
    pm = toy_pm()
    cfg, method = load_config("toy", fast(tmp_path / "ref"), {"data.max_eval_samples": 10}, plugins=pm)
    engine = Engine(cfg, method, pm).load()
    data = engine.data.formatted(need_train=False)["eval"]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            batch = engine.formatter.collate([data[i]])
            logits = engine.model(input_ids=batch["input_ids"]).logits[0, :-1].double()
            labels = batch["labels"][0, 1:]
            keep = labels != -100
            nll -= torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep, None]).sum().item()
            tokens += int(keep.sum())
    return nll / tokens, tokens


def test_eval_loss_does_not_depend_on_the_eval_batch_size(tmp_path):
    by_size = {size: eval_with_batch_size(tmp_path, size) for size in (3, 10)}
    expected, _ = float64_reference(tmp_path)
    for metrics in by_size.values():
        assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
        assert metrics["eval_token_nll"] == pytest.approx(expected, rel=1e-5)
    assert by_size[3]["eval_accuracy"] == pytest.approx(by_size[10]["eval_accuracy"], rel=1e-9)
    # The per-batch mean (TRL's way, kept by ORPO/DPO/CPO/SimPO) does depend on it: batches of 3 rows hold
    # different numbers of tokens, and each batch weighs the same.
    per_batch = {size: eval_with_batch_size(tmp_path / "pb", size, per_batch=True) for size in (3, 10)}
    assert per_batch[10]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(per_batch[3]["eval_loss"] - expected) > 1e-4 * expected
    assert by_size[3]["eval_plain_nll"] != pytest.approx(by_size[10]["eval_plain_nll"], rel=1e-6)


def test_preference_losses_keep_the_per_batch_eval_loss(pm):
    import alignkit_cpo
    import alignkit_dpo
    import alignkit_simpo

    every = plugin_manager(alignkit_orpo, alignkit_dpo, alignkit_cpo, alignkit_simpo)
    for name in ("orpo", "dpo", "cpo", "simpo"):
        assert alignkit.get_method(name, every).loss.eval_loss_per_batch is True, name
    assert alignkit.Loss.eval_loss_per_batch is False and ToyLoss(None).config is None

"""The StepContext: passed as ctx= only to callables that declare it; what it holds; ctx.reduce."""

import pytest
import torch

import alignkit
import alignkit_orpo
from alignkit import StepContext, load_config
from alignkit.engine.loop import Engine
from alignkit.plugin.context import call, takes_ctx
from alignkit.testing import plugin_manager
from helpers import fast
from toy_method import ToyLoss, ToyPlugin


def test_ctx_is_passed_only_to_callables_that_declare_it():
    ctx = StepContext(training=True, step=0, micro_batch=0, micro_batches=1)

    def with_ctx(x, ctx):
        return x, ctx

    def without(x, **kwargs):  # **kwargs does not count: only a parameter named ctx
        return x, kwargs

    class Callable:
        def __call__(self, x, ctx=None):
            return ctx

    assert call(with_ctx, 1, ctx=ctx) == (1, ctx)
    assert call(without, 1, ctx=ctx) == (1, {})
    assert call(Callable(), 1, ctx=ctx) is ctx
    assert takes_ctx(ToyLoss(None)) and takes_ctx(ToyLoss(None).counts)

    class LegacyLoss(alignkit.Loss):  # written before the step context existed: never handed one
        def counts(self, batch):
            return {"rows": 1}

        def __call__(self, model, batch, ref=None):
            return alignkit.LossOutput(terms={})

    assert not takes_ctx(LegacyLoss(None)) and not takes_ctx(LegacyLoss(None).counts)


def test_reduce_on_one_process_is_a_detached_copy():
    ctx = StepContext(training=True, step=0, micro_batch=0, micro_batches=1)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = ctx.reduce(x * 2, "mean")
    assert torch.equal(y, torch.tensor([2.0, 4.0])) and not y.requires_grad
    with pytest.raises(ValueError, match="op must be 'sum' or 'mean'"):
        ctx.reduce(x, "max")


def test_the_engine_hands_each_stage_its_context(tmp_path):
    ToyLoss.seen = []
    try:
        alignkit.run("toy", fast(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=3,
                                 per_device_eval_batch_size=4, eval_steps=2),
                                 plugins=plugin_manager(alignkit_orpo, ToyPlugin()))
    finally:
        seen, ToyLoss.seen = ToyLoss.seen, None
    train = [(stage, c) for stage, c in seen if c.training]
    # per step: counts for each of the 3 micro-batches first, then the loss on each
    assert [s for s, _ in train] == (["counts"] * 3 + ["loss"] * 3) * 2
    assert [(c.step, c.micro_batch, c.micro_batches) for s, c in train if s == "loss"] == [
        (0, 0, 3), (0, 1, 3), (0, 2, 3), (1, 0, 3), (1, 1, 3), (1, 2, 3)]
    evals = [c for s, c in seen if s == "loss" and not c.training]
    assert [(c.step, c.micro_batch, c.micro_batches) for c in evals] == [(2, 0, 2), (2, 1, 2)]  # 8 rows, batches of 4
    assert all(c.num_processes == 1 and c.process_index == 0 and c.generator is None for _, c in seen)


def test_reference_gets_the_context_and_collective_losses_evaluate_in_lockstep(tmp_path):
    seen = []

    class RefLoss(ToyLoss):
        needs_reference_model = True
        collective = True

        def reference(self, ref_model, batch, ctx):
            seen.append(ctx.training)
            return {"n": batch["input_ids"].new_zeros(batch["input_ids"].shape[0])}

        def __call__(self, model, batch, ctx, ref):
            assert ref["n"].shape[0] == batch["input_ids"].shape[0]
            total = ctx.reduce(torch.tensor(1.0))  # a collective: every process runs every eval batch
            out = super().__call__(model, batch, ctx)
            out.metrics["reduced"] = total
            return out

    class RefPlugin(ToyPlugin):
        @alignkit.hookimpl
        def register_methods(self, register):
            register(alignkit.Method(name="toy-ref",
                                     config=alignkit.get_method("toy", plugin_manager(ToyPlugin())).config,
                                     formatter="toy", loss=RefLoss, description="toy with a reference"))

        @alignkit.hookimpl
        def register_formatters(self, register):
            from toy_method import ToyFormatter

            register("toy", ToyFormatter)

    pm = plugin_manager(alignkit_orpo, RefPlugin())
    cfg, method = load_config("toy-ref", fast(tmp_path, max_steps=1), {"data.train": "builtin:toy-sort"}, plugins=pm)
    engine = Engine(cfg, method, pm)
    assert engine.lockstep
    metrics = engine.train()
    assert seen and True in seen and False in seen and metrics["eval_reduced"] == 1.0


def test_two_processes_reduce_through_the_context_and_match_one(tmp_path):
    """torchrun, 2 CPU processes of 4 rows each vs one process of 8: ctx.reduce sums (and averages) over the
    processes; exact (sum, count) metrics and the collective (lock-step) evaluation equal one process's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port, read_jsonl

    worker = Path(__file__).parent / "toy_distributed.py"
    env = {"PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ALIGNKIT_LOAD_PLUGINS": ""}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), str(worker), str(tmp_path / "two"), "4"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # the process group is torn down (its gloo threads joined) before the interpreter's teardown: left to it, a
    # process that finished its run aborted now and then ("terminate called without an active exception")
    left = re.findall(r"threads at exit: \[[^\]]*\]", two.stderr)  # the two processes' lines may interleave
    assert len(left) == 2 and not any("gloo" in line for line in left), left
    one = subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), "8"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows_one, rows_two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2, 3, 3]
    for a, b in zip(rows_one, rows_two):
        prefix = "eval_" if "eval_loss" in a else ""
        assert a[prefix + "global_rows"] == b[prefix + "global_rows"] == 8.0  # 4 + 4 on two processes
        assert b[prefix + "mean_rows"] == 4.0 and a[prefix + "mean_rows"] == 8.0
        for key in ("loss", "token_nll", "accuracy"):
            assert b[prefix + key] == pytest.approx(a[prefix + key], rel=1e-5), (a["step"], key)
    assert rows_two[0]["probe"] == 1.0

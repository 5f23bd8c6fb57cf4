"""Run by test_step_context under torchrun (or alone): the toy method with a loss that reduces across
processes through ctx.reduce (Loss.collective), training and evaluating; argv[1] is the output folder,
argv[2] the per-process batch size."""

import atexit
import os
import sys


def _threads_left() -> None:
    """Registered first, so it runs after every exit hook alignkit registers: the native threads still running as
    the interpreter tears down (the test asserts no process group's threads are among them)."""
    names = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    os.write(2, f"threads at exit: {sorted(names)}\n".encode())  # one write: two processes share the pipe


atexit.register(_threads_left)
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import alignkit  # noqa: E402
import alignkit_orpo  # noqa: E402
from alignkit.testing import plugin_manager  # noqa: E402
from toy_method import ToyLoss, ToyPlugin  # noqa: E402


class CollectiveLoss(ToyLoss):
    collective = True

    def __call__(self, model, batch, ctx):
        out = super().__call__(model, batch, ctx)
        rows = torch.tensor(float(batch["input_ids"].shape[0]), device=ctx.device)
        out.metrics["global_rows"] = ctx.reduce(rows)  # the rows of this micro-batch on every process
        out.metrics["mean_rows"] = ctx.reduce(rows, "mean")
        return out


out_dir, batch = sys.argv[1], int(sys.argv[2])
alignkit.run("toy", plugins=plugin_manager(alignkit_orpo, ToyPlugin(loss=CollectiveLoss)), **{
    "train.output_dir": out_dir, "train.max_steps": 3, "train.logging_steps": 1, "train.eval_steps": 3,
    "train.per_device_train_batch_size": batch, "train.per_device_eval_batch_size": batch,
    "data.max_train_samples": 24, "data.max_eval_samples": 8, "train.disable_tqdm": True, "train.plots": False,
    "train.save_steps": None, "train.eval_on_start": False})

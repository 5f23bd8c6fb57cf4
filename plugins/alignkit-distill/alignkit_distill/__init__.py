"""Distillation from a teacher model (TRL 1.16's GKDTrainer; Agarwal et al., arXiv 2306.13649) as an alignkit
method: the generalized Jensen-Shannon divergence between teacher and student at every completion token, on the
data's completions, the student's own samples (`lmbda`) or the teacher's (`seq_kd`)."""

import alignkit
from alignkit.blocks.demo import demo_defaults
from alignkit_distill import demo
from alignkit_distill.config import DistillConfig
from alignkit_distill.formatter import DistillFormatter
from alignkit_distill.loss import DistillLoss, generalized_jsd
from alignkit_distill.rollout import DistillRollout

#: the built-in demo: a fresh tiny student distils the built-in teacher (the tiny model trained on sorting)
DEMO_DEFAULTS = demo.DemoDefaults(demo_defaults(
    3e-3, None, **{"method.max_new_tokens": 14, "method.lmbda": 0.5, "method.temperature": 1.0,
                   "train.max_steps": 150, "train.warmup_ratio": 0.0, "train.eval_steps": 50,
                   "train.save_steps": 50, "data.max_eval_samples": 100}))


def validate(config) -> None:
    """Before any work: a teacher is named (the reference model), the prompt is not trained (it is what the student
    and the teacher sample from) and rows are not packed; the built-in teacher of the demo is built if missing."""
    if not config.model.ref_name_or_path:
        raise alignkit.ConfigError("model.ref_name_or_path: method distill needs a teacher model; set it to the "
                                   "teacher's name or folder (same vocabulary as model.name_or_path)")
    if config.method.completion_only_loss is False:
        raise alignkit.ConfigError("method.completion_only_loss=false: method distill trains the completion only "
                                   "(the prompt is what the student and teacher sample from); remove the key")
    if config.method.packing:
        raise alignkit.ConfigError("method.packing=true: method distill samples per prompt and cannot pack rows; "
                                   "remove method.packing")
    if config.model.ref_name_or_path == str(demo.teacher_path()):
        demo.ensure_teacher(config.model)


METHOD = alignkit.Method(
    name="distill", config=DistillConfig, formatter=DistillFormatter, loss=DistillLoss,
    rollout=DistillRollout, validate=validate,
    description="Distillation from a teacher (GKD): generalized JSD on data, student (lmbda) or teacher (seq_kd) "
                "completions.",
    demo_data="sort-distill", demo_defaults=DEMO_DEFAULTS, progress_metrics=("kl_teacher_student",),
    citation="@inproceedings{agarwal2024onpolicy, title={On-Policy Distillation of Language Models: Learning from "
             "Self-Generated Mistakes}, booktitle={ICLR}, year={2024}}",
)


@alignkit.hookimpl
def register_methods(register):
    register(METHOD)


@alignkit.hookimpl
def register_datasets(register):
    for name, loader in demo.DATASETS.items():
        register(name, loader)


__all__ = ["DEMO_DEFAULTS", "METHOD", "DistillConfig", "DistillFormatter", "DistillLoss", "DistillRollout",
           "generalized_jsd"]

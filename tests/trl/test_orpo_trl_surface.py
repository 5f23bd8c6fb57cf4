"""The transformers.Trainer surface of alignkit_orpo.ORPOTrainer against recorded TRL 0.15.2 behaviour.

tests/trl/trl_surface_scenario.py uses the surface as TRL users do (state/log_history, callbacks added and
removed, log_metrics, save_metrics, save_state, evaluate, predict, checkpoints, resume from checkpoint-N).
It was run on TRL 0.15.2 (transformers 4.49, torch 2.13, in its own venv; 2026-11-25) on the same offline
stand-ins (benchmarks/trl_standins.py); what it reported is written below as expectations.
"""

import sys

import pytest

from helpers import BENCHMARKS

sys.path.insert(0, str(BENCHMARKS))
from trl_standins import build_qwen2, build_zen  # noqa: E402
from trl_surface_scenario import run  # noqa: E402

TRAIN_ROW = ["epoch", "grad_norm", "learning_rate", "log_odds_chosen", "log_odds_ratio", "logits/chosen",
             "logits/rejected", "logps/chosen", "logps/rejected", "loss", "nll_loss", "rewards/accuracies",
             "rewards/chosen", "rewards/margins", "rewards/rejected", "step"]
EVAL_ROW = ["epoch", "eval_log_odds_chosen", "eval_log_odds_ratio", "eval_logits/chosen", "eval_logits/rejected",
            "eval_logps/chosen", "eval_logps/rejected", "eval_loss", "eval_nll_loss", "eval_rewards/accuracies",
            "eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/rejected", "eval_runtime",
            "eval_samples_per_second", "eval_steps_per_second", "step"]
SUMMARY_ROW = ["epoch", "step", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
               "train_steps_per_second"]
ROWS = {"TRAIN": TRAIN_ROW, "EVAL": EVAL_ROW, "SUMMARY": SUMMARY_ROW}
TRAIN_METRICS = ["epoch", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second"]
STATE_KEYS = ["best_metric", "best_model_checkpoint", "epoch", "eval_steps", "global_step", "is_hyper_param_search",
              "is_local_process_zero", "is_world_process_zero", "log_history", "logging_steps", "max_steps",
              "num_input_tokens_seen", "num_train_epochs", "save_steps", "stateful_callbacks", "total_flos",
              "train_batch_size", "trial_name", "trial_params"]


def rows(*spec):
    return [{"keys": ROWS[kind], "step": step, "epoch": epoch} for kind, step, epoch in spec]


HISTORY = [("TRAIN", 1, 0.2), ("TRAIN", 2, 0.4), ("EVAL", 3, 0.6), ("TRAIN", 4, 0.8), ("TRAIN", 6, 1.2),
           ("EVAL", 6, 1.2)]
RECORDED_TRL_0_15_2 = {
    "callbacks_initial": ["DefaultFlowCallback", "PrinterCallback"],
    "callbacks_added": ["DefaultFlowCallback", "PrinterCallback", "Recorder", "PrinterCallback"],
    "popped": "PrinterCallback",
    "callbacks_after_pop": ["DefaultFlowCallback", "Recorder", "PrinterCallback"],
    "callbacks_after_remove": ["DefaultFlowCallback", "Recorder", "PrinterCallback"],
    "tokenized_columns": ["chosen_input_ids", "chosen_labels", "prompt_input_ids", "rejected_input_ids",
                          "rejected_labels"],
    "world_process_zero": [True, True],
    # PrinterCallback pops total_flos from the summary row's dict, which is also TrainOutput.metrics
    "train_output": {"type": "TrainOutput", "global_step": 6, "metrics": TRAIN_METRICS,
                     "training_loss_is_train_loss": True},
    "log_history": rows(*HISTORY, ("SUMMARY", 6, 1.2)),
    "events": ["train_begin@0", "epoch_begin@0", "step_end@1", "log@1", "step_end@2", "log@2", "step_end@3", "log@3",
               "evaluate@3", "save@3", "step_end@4", "log@4", "step_end@5", "epoch_end@5", "epoch_begin@5",
               "step_end@6", "log@6", "log@6", "evaluate@6", "save@6", "epoch_end@6", "log@6", "train_end@6",
               "log@6", "evaluate@6"],
    "state": {"global_step": 6, "max_steps": 6, "num_train_epochs": 2, "logging_steps": 2, "eval_steps": 3,
              "save_steps": 3, "train_batch_size": 4, "epoch": 1.2},
    "checkpoints": ["checkpoint-3", "checkpoint-6"],
    "checkpoint_files": ["trainer_state.json", "training_args.bin"],
    "checkpoint_state_keys": STATE_KEYS,
    "checkpoint_state": {"global_step": 6, "log_history": rows(*HISTORY)},
    "log_metrics": {"first": "***** train metrics *****", "lines": 6, "names": TRAIN_METRICS},
    "save_metrics_files": ["all_results.json", "train_results.json"],
    "train_results_keys": TRAIN_METRICS,
    "saved_state_keys": STATE_KEYS,
    "evaluate_keys": [k for k in EVAL_ROW if k != "step"],
    "evaluate_row": rows(("EVAL", 6, 1.2)),
    "predict": {"error": "AttributeError"},
    "resume": {"global_step": 6, "log_history": rows(*HISTORY, ("SUMMARY", 6, 1.2)), "metrics": TRAIN_METRICS},
    "resume_true_without_checkpoint": "ValueError",
}
#: where alignkit differs on purpose: TRL 0.15.2's prediction_step fails on its own float metrics; alignkit
#: returns what it meant to. transformers 5 writes one more TrainerState field (best_global_step).
DELIBERATE = {
    "predict": {"type": "PredictionOutput", "label_ids": "ndarray",
                "metrics": ["test_loss", "test_runtime", "test_samples_per_second", "test_steps_per_second"]},
    "checkpoint_state_keys": sorted([*STATE_KEYS, "best_global_step"]),
    "saved_state_keys": sorted([*STATE_KEYS, "best_global_step"]),
}


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    return run("alignkit_orpo", str(build_qwen2(root / "qwen2")), str(build_zen(root / "zen")), root / "out")


@pytest.mark.parametrize("field", sorted(RECORDED_TRL_0_15_2))
def test_field_as_recorded_under_trl(facts, field):
    assert facts[field] == DELIBERATE.get(field, RECORDED_TRL_0_15_2[field])


def test_no_field_unrecorded(facts):
    assert set(facts) == set(RECORDED_TRL_0_15_2)

"""A script that uses the transformers.Trainer surface of an ORPOTrainer the way TRL users do, and
reports what it saw as plain facts (field names, row structure, steps, files).

It runs unchanged on TRL 0.15.2 (`--lib trl`, in a TRL venv: that is how the expectations in
tests/test_orpo_trl_surface.py were recorded) and on alignkit (`--lib alignkit_orpo`).

    python tests/trl/trl_surface_scenario.py --lib trl --model DIR --data ZEN_DIR --out DIR
"""

import argparse
import contextlib
import importlib
import io
import json
import os
from pathlib import Path


def run(lib: str, model_dir: str, data_dir: str, out: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    trl = importlib.import_module(lib)
    facts: dict = {}
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset(data_dir, "standard_preference")

    class Recorder(TrainerCallback):
        def __init__(self):
            self.events = []

        def _add(self, name, state):
            self.events.append(f"{name}@{state.global_step}")

        def on_train_begin(self, args, state, control, **kw):
            self._add("train_begin", state)

        def on_epoch_begin(self, args, state, control, **kw):
            self._add("epoch_begin", state)

        def on_step_end(self, args, state, control, **kw):
            self._add("step_end", state)

        def on_log(self, args, state, control, logs=None, **kw):
            self._add("log", state)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self._add("evaluate", state)

        def on_save(self, args, state, control, **kw):
            self._add("save", state)

        def on_epoch_end(self, args, state, control, **kw):
            self._add("epoch_end", state)

        def on_train_end(self, args, state, control, **kw):
            self._add("train_end", state)

    def make(run_dir, **extra):
        args = trl.ORPOConfig(output_dir=str(run_dir), per_device_train_batch_size=4, per_device_eval_batch_size=2,
                              max_steps=6, logging_steps=2, logging_first_step=True, eval_strategy="steps",
                              eval_steps=3, save_steps=3, learning_rate=1e-3, report_to="none", disable_tqdm=True,
                              seed=1, **extra)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        return trl.ORPOTrainer(model=model, args=args, processing_class=tok, train_dataset=data["train"],
                               eval_dataset=data["test"])

    def names(trainer):
        return [type(cb).__name__ for cb in trainer.callback_handler.callbacks]

    def rows(history):
        return [{"keys": sorted(r), "step": r["step"], "epoch": round(r["epoch"], 4)} for r in history]

    def state_keys(path):
        return sorted(json.loads(Path(path).read_text()))

    trainer = make(out / "run")
    facts["callbacks_initial"] = names(trainer)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.add_callback(PrinterCallback)
    facts["callbacks_added"] = names(trainer)
    popped = trainer.pop_callback(PrinterCallback)
    facts["popped"] = type(popped).__name__
    facts["callbacks_after_pop"] = names(trainer)
    trainer.add_callback(PrinterCallback())
    trainer.remove_callback(PrinterCallback)
    facts["callbacks_after_remove"] = names(trainer)
    facts["tokenized_columns"] = sorted(set(trainer.train_dataset.column_names) & {
        "prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"})
    facts["world_process_zero"] = [trainer.is_world_process_zero(), trainer.is_local_process_zero()]

    result = trainer.train()
    facts["train_output"] = {"type": type(result).__name__, "global_step": result.global_step,
                             "metrics": sorted(result.metrics),
                             "training_loss_is_train_loss": result.training_loss == result.metrics["train_loss"]}
    facts["log_history"] = rows(trainer.state.log_history)
    facts["events"] = recorder.events
    facts["state"] = {k: getattr(trainer.state, k) for k in ("global_step", "max_steps", "num_train_epochs",
                                                              "logging_steps", "eval_steps", "save_steps",
                                                              "train_batch_size")}
    facts["state"]["epoch"] = round(trainer.state.epoch, 4)
    checkpoints = sorted(p.name for p in (out / "run").iterdir() if p.name.startswith("checkpoint-"))
    facts["checkpoints"] = checkpoints
    last = out / "run" / checkpoints[-1]
    facts["checkpoint_files"] = sorted(n for n in ("trainer_state.json", "training_args.bin") if (last / n).is_file())
    facts["checkpoint_state_keys"] = state_keys(last / "trainer_state.json")
    saved = json.loads((last / "trainer_state.json").read_text())
    facts["checkpoint_state"] = {"global_step": saved["global_step"], "log_history": rows(saved["log_history"])}

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.log_metrics("train", result.metrics)
    lines = printed.getvalue().splitlines()
    facts["log_metrics"] = {"first": lines[0], "lines": len(lines), "names": sorted(line.split("=")[0].strip()
                                                                                     for line in lines[1:])}
    trainer.save_metrics("train", result.metrics)
    facts["save_metrics_files"] = sorted(n for n in ("train_results.json", "all_results.json")
                                         if (out / "run" / n).is_file())
    facts["train_results_keys"] = state_keys(out / "run" / "train_results.json")
    trainer.save_state()
    facts["saved_state_keys"] = state_keys(out / "run" / "trainer_state.json")

    metrics = trainer.evaluate()
    facts["evaluate_keys"] = sorted(metrics)
    facts["evaluate_row"] = rows(trainer.state.log_history[-1:])
    try:  # TRL 0.15.2's prediction_step fails here (it calls .unsqueeze on the float metrics it logs)
        prediction = trainer.predict(trainer.eval_dataset)  # TRL predicts on tokenized rows only
        facts["predict"] = {"type": type(prediction).__name__, "metrics": sorted(prediction.metrics),
                            "label_ids": type(prediction.label_ids).__name__}
    except AttributeError as e:
        facts["predict"] = {"error": type(e).__name__}

    resumed = make(out / "run")
    resumed_result = resumed.train(resume_from_checkpoint=str(out / "run" / "checkpoint-3"))
    facts["resume"] = {"global_step": resumed_result.global_step, "log_history": rows(resumed.state.log_history),
                       "metrics": sorted(resumed_result.metrics)}
    fresh = make(out / "empty")
    try:
        fresh.train(resume_from_checkpoint=True)
        facts["resume_true_without_checkpoint"] = "trained"
    except Exception as e:  # noqa: BLE001 - the exception type is the fact recorded
        facts["resume_true_without_checkpoint"] = type(e).__name__
    return facts


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run(a.lib, a.model, a.data, a.out), indent=1))

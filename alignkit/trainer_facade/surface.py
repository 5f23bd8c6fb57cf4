"""The transformers.Trainer methods TRL users call that are not about one method: logging, metrics files, state,
callbacks, process checks, the Hub, dataloaders, optimizer and schedule creation (shared by every TRL-style trainer)."""

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import log_metrics, metrics_format, save_metrics, save_state

from alignkit import build_lr_scheduler, build_optimizer


class TrainerSurface:
    """Needs `self.args`, `self.state`, `self.control`, `self.callback_handler`, `self.engine`, `self.config`."""

    # transformers' own helpers, bound as Trainer binds them: same output, same files
    log_metrics = log_metrics
    metrics_format = metrics_format
    save_metrics = save_metrics
    save_state = save_state

    def __getattr__(self, name: str):
        """Only for names not found: a transformers.Trainer name this facade does not offer says so."""
        from transformers import Trainer

        if not name.startswith("_") and hasattr(Trainer, name):
            cls = type(self).__name__
            raise AttributeError(f"{cls}.{name}: transformers.Trainer's {name} is not offered by alignkit's {cls} "
                                 "(alignkit's engine runs the training loop; docs/trl.md lists the surface)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Append a row to state.log_history (with the means of stored metrics, `epoch` and `step`) and tell
        the callbacks, as TRL's trainers' log does."""
        kind = "train" if "loss" in logs else "eval"
        for key, values in self._stored_metrics.pop(kind, {}).items():
            logs[key] = torch.tensor(values, dtype=torch.float64).mean().item()
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    # ---- callbacks and processes ------------------------------------------------------------------

    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def is_world_process_zero(self) -> bool:
        return self.engine.accelerator.is_main_process

    def is_local_process_zero(self) -> bool:
        return self.engine.accelerator.is_local_main_process

    @property
    def accelerator(self):
        return self.engine.accelerator

    @property
    def model_wrapped(self):
        return self.model  # one process here; under accelerate launch the engine wraps it per run

    @property
    def tokenizer(self):
        return self.processing_class

    # ---- optimizer and schedule (the engine asks for them through these) ---------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The optimizer the config's optim names, built by transformers' own factory (alignkit.engine.optim)."""
        if self.optimizer is None:
            self.optimizer = build_optimizer(model if model is not None else self.model, self.config.train)
        self.callback_handler.optimizer = self.optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = build_lr_scheduler(self.config.train, optimizer or self.optimizer, num_training_steps)
        self.callback_handler.lr_scheduler = self.lr_scheduler
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_scheduler(num_training_steps, self.create_optimizer())

    # ---- dataloaders: batches as the engine collates them ---------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=True,
                          collate_fn=self.engine.collate_fn, generator=torch.Generator().manual_seed(self.args.seed))

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        ds = self._tokenized(eval_dataset, "eval") if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError(f"{type(self).__name__}.get_eval_dataloader: no eval_dataset was given to the trainer "
                             "or here")
        return DataLoader(ds, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.engine.collate_fn)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        return self.get_eval_dataloader(test_dataset)

    # ---- the Hub ----------------------------------------------------------------------------------

    def _hub_repo_id(self) -> str:
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def init_hf_repo(self, token: str | None = None) -> str:
        """Create (or find) the Hub repository, as Trainer does when push_to_hub is set; one-line error offline."""
        from huggingface_hub import HfApi

        repo_id = self._hub_repo_id()
        try:
            url = HfApi(token=token or self.args.hub_token).create_repo(repo_id, private=self.args.hub_private_repo,
                                                                       exist_ok=True)
        except Exception as e:  # offline mode, no network, no token: all end here
            raise ConnectionError(f"push_to_hub: cannot reach the Hugging Face Hub for {repo_id} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                                  "check the network and `huggingface-cli login`, or drop --push_to_hub") from None
        self.hub_model_id = getattr(url, "repo_id", repo_id)
        return self.hub_model_id

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs) -> str:
        """Upload output_dir (model, tokenizer, model card; not checkpoints) through huggingface_hub."""
        from huggingface_hub import HfApi

        model_name = kwargs.pop("model_name", None) or Path(self.args.output_dir).absolute().name
        if self.is_world_process_zero():
            self.create_model_card(model_name=model_name, **kwargs)
        repo_id = self.init_hf_repo(token)
        if not self.is_world_process_zero():
            return repo_id
        try:
            info = HfApi(token=token or self.args.hub_token).upload_folder(
                repo_id=repo_id, folder_path=self.args.output_dir, commit_message=commit_message, revision=revision,
                ignore_patterns=["checkpoint-*", "checkpoints/*", "*.lock", ".*"])
        except Exception as e:
            raise ConnectionError(f"push_to_hub: uploading {self.args.output_dir} to {repo_id} failed "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
                                  ) from None
        return str(getattr(info, "commit_url", info))

    def hyperparameter_search(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.hyperparameter_search is not supported by alignkit: run one "
                                  "training per setting (e.g. a loop over config values) and compare their eval "
                                  "metrics")

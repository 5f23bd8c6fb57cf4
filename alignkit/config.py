"""The run config: `model`, `data`, `train` and `generation` (the core's) plus `method` (validated by the plugin).

Layers, lowest first: field defaults < the method's demo data (data.train=builtin:<demo_data>) < the
method's `defaults` < the built-in presets < the YAML file < `key=value` overrides. Built-in data brings
its held-out split as eval set; built-in data with the built-in model also brings the method's
`demo_defaults` (the demo's training settings). YAML is data only.
"""

import functools
import json
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from transformers import SchedulerType

from alignkit.engine.envvalues import (  # noqa: F401 (re-exported: recorded, environment_values, redact, resolve_env)
    env_interpolations,
    environment_values,
    recorded,
    redact,
    resolve_env,
)
from alignkit.errors import ConfigError, did_you_mean
from alignkit.plugin.method import Method, MethodConfig

BUILTIN_MODEL = "builtin:tiny"
BUILTIN_VLM = "builtin:tiny-vlm"  # a tiny vision-language model (alignkit.builtin.vlm)
SCHEDULERS = sorted(s.value for s in SchedulerType)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio", "swanlab")

#: applied when data.train is built-in (and no eval_fraction is set): evaluate on its held-out split.
BUILTIN_DATA_PRESET = {"data": {"eval": "${data.train}", "eval_split": "test"}}


class Section(BaseModel):
    # inf/nan are never valid settings (a learning rate of .inf passes gt=0)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSettings(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scaling is alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt: names, or all-linear.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved with the adapter.")


#: from_pretrained arguments that alignkit passes itself, and the key that sets each
FIXED_LOAD_ARGUMENTS = {"trust_remote_code": "model.trust_remote_code", "revision": "model.revision",
                        "dtype": "model.dtype", "torch_dtype": "model.dtype",
                        "attn_implementation": "model.attn_implementation",
                        "pretrained_model_name_or_path": "model.name_or_path"}


class ModelConfig(Section):
    name_or_path: str = Field(BUILTIN_MODEL,
                              description="Hub name or local folder of the model; builtin:tiny is an offline tiny "
                              "Llama, builtin:tiny-vlm an offline tiny vision-language model.")
    tokenizer_name_or_path: str | None = Field(None, description="Tokenizer to load; default: the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32",
                                                                     description="Dtype of the loaded weights.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repository to run. Off unless you "
                                    "trust it.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model and tokenizer.")
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2, ...; default: "
                                            "transformers' choice.")
    init_kwargs: dict[str, Any] = Field(default_factory=dict,
                                        description="Extra keyword arguments for from_pretrained (TRL's "
                                        "model_init_kwargs).")
    ref_name_or_path: str | None = Field(None, description="Reference model for losses that need one; default: a "
                                         "frozen copy of the policy's initial weights (with model.peft: the policy "
                                         "with adapters disabled). Used as given with model.peft too.")
    ref_offload: bool = Field(False, description="Keep the reference model's weights in CPU memory and move them to "
                              "the device only for its own forwards: the policy's forward and backward have the "
                              "device to themselves, at the cost of two transfers per reference call.")
    peft: LoraSettings | None = Field(None, description="Train LoRA adapters instead of all weights (needs peft); e.g. "
                                      "model.peft.r=8.")
    freeze_vision_tower: bool = Field(True, description="A vision-language model's vision tower takes no gradient "
                                      "(and no LoRA adapters: those go to the language model).")


    @model_validator(mode="after")
    def _loading_arguments(self) -> "ModelConfig":
        if self.name_or_path in (BUILTIN_MODEL, BUILTIN_VLM) and self.init_kwargs:
            raise ValueError(f"model.init_kwargs: the built-in model {self.name_or_path} is built, not loaded; "
                             "it takes no loading arguments (remove model.init_kwargs)")
        fixed = sorted(set(self.init_kwargs) & set(FIXED_LOAD_ARGUMENTS))
        if fixed:
            raise ValueError("model.init_kwargs: " + ", ".join(f"{k} is set by {FIXED_LOAD_ARGUMENTS[k]}"
                                                               for k in fixed)
                             + "; set it there instead")
        return self


class DataConfig(Section):
    train: str | None = Field(None, description="Training data: a .jsonl/.json/.parquet/.csv file, a save_to_disk "
                              "folder, a hub name, or builtin:NAME (a plugin's built-in data); default: the method's "
                              "demo data.")
    train_split: str = Field("train", description="Split of `train` to use (hub datasets, DatasetDict folders and "
                             "built-ins).")
    eval: str | None = Field(None, description="Evaluation data, in the same forms as `train`; optional.")
    eval_split: str = Field("test", description="Split of `eval` to use.")
    eval_fraction: float | None = Field(None, gt=0, lt=1,
                                        description="Hold out this fraction of `train` (shuffled with train.seed) as "
                                        "the eval set.")
    max_train_samples: int | None = Field(None, gt=0, description="Use only the first N training examples.")
    max_eval_samples: int | None = Field(None, gt=0, description="Use only the first N eval examples.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataConfig":
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("set data.eval or data.eval_fraction, not both")
        return self


class TrainConfig(Section):
    output_dir: str = Field("outputs/run",
                            description="Where the model, config.yaml, metrics.jsonl and checkpoints/ go (default "
                            "outputs/<method>).")
    overwrite_output_dir: bool = Field(
        False, description="Start over in an output_dir that holds an earlier run or files alignkit did not write: "
                           "removes only what alignkit wrote there (listed in its .alignkit-manifest.json: model, "
                           "checkpoints, metrics, plots, ...) and keeps every other file.")
    skip_nonfinite_steps: bool = Field(False, description="Skip an optimizer step whose loss or gradient is NaN/inf "
                                       "instead of stopping.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    optim: str = Field("adamw_torch_fused",
                       description="Optimizer, by its transformers.Trainer name (adamw_torch_fused, the default as in "
                       "transformers 5: AdamW in one fused kernel per parameter group; adamw_torch, sgd, rmsprop, "
                       "adafactor, ...).")
    optim_args: str | None = Field(None, description="Extra optimizer arguments as transformers takes them, e.g. "
                                   "'momentum=0.9,centered=true'.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Examples per micro-batch on each process.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per eval batch on each process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(3.0, gt=0, description="Epochs to train when max_steps is not set.")
    max_steps: int = Field(-1, description="Optimizer steps to train; overrides num_train_epochs when > 0.")
    lr_scheduler_type: str = Field("linear", description="Schedule from transformers.get_scheduler: "
                                   f"{', '.join(SCHEDULERS)}.")
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict,
                                                description="Extra arguments of the schedule, e.g. {num_cycles: 2}.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of the steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps; overrides warmup_ratio when > 0.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not applied to biases and norm weights).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this; 0 disables clipping.")
    logging_steps: int = Field(10, gt=0, description="Write a metrics row every N optimizer steps (means over the "
                               "window).")
    logging_first_step: bool = Field(False, description="Also log after the first step.")
    eval_steps: int | None = Field(None, gt=0,
                                   description="Evaluate every N steps; evaluation also runs at the end when there is "
                                   "eval data.")
    eval_on_start: bool = Field(False, description="Evaluate once before training.")
    save_steps: int | None = Field(500, gt=0, description="Write a checkpoint every N steps; null for none.")
    save_total_limit: int | None = Field(None, gt=0, description="Keep at most this many checkpoints (the newest).")
    resume_from_checkpoint: str | None = Field(None, description="A checkpoint folder, or auto for the latest in "
                                               "output_dir/checkpoints.")
    checkpoint_dir: str = Field("checkpoints",
                                description="Folder of the checkpoint-N folders, relative to output_dir; '.' puts them "
                                "in output_dir itself, as transformers.Trainer does.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for initialisation, shuffling and dropout.")
    shuffle: bool = Field(True, description="Shuffle the training rows each epoch (with seed); false: in dataset "
                          "order, as TRL's train_sampling_strategy='sequential'.")
    group_by_length: bool = Field(
        False, description="Shuffle in groups of similar length so micro-batches pad little (still set by the seed).")
    bf16: bool = Field(False, description="bfloat16 mixed precision.")
    fp16: bool = Field(False, description="float16 mixed precision (GPU only).")
    use_cpu: bool = Field(False, description="Train on the CPU even when an accelerator is present.")
    gradient_checkpointing: bool = Field(False,
                                         description="Recompute activations in the backward pass to save memory.")
    report_to: list[str] = Field(default_factory=list,
                                 description=f"Trackers through accelerate: {', '.join(TRACKERS)}.")
    run_name: str | None = Field(None, description="Run name for trackers; default: the output_dir's name.")
    plots: bool = Field(True, description="At the end, draw metrics.jsonl as PNG charts in output_dir/plots (needs "
                        "matplotlib).")
    dataloader_num_workers: int = Field(0, ge=0, description="Worker processes of the dataloaders.")
    release_host_memory: bool = Field(
        True, description="On Linux with glibc, CPU tensors of 4 MiB and more come from mmap, so memory a step frees "
        "goes back to the OS at once instead of staying in the process (a lower peak RSS on CPU, a few percent "
        "slower there; process-wide); false: leave the allocator as it is.")
    disable_tqdm: bool = Field(False, description="Hide the progress bar.")
    # the hub, as transformers.Trainer pushes (alignkit.engine.hub): in a worker thread, never stopping training
    push_to_hub: bool = Field(False, description="Push the model to the Hugging Face Hub (train.hub_model_id) in the "
                              "background, as train.hub_strategy says, and at the end.")
    hub_model_id: str | None = Field(None, description="Hub repository (owner/name or name) to push to; default: "
                                     "output_dir's name.")
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = Field(
        "every_save", description="end: push at the end only; every_save: also the model at each checkpoint; "
        "checkpoint: also the latest checkpoint as last-checkpoint/ (resumable); all_checkpoints: also each "
        "checkpoint as checkpoint-N/.")
    hub_token: str | None = Field(None, exclude=True, repr=False,
                                  description="Hub token; default: HF_TOKEN or the saved login. Never written to any "
                                  "file (config.yaml shows null): give it as ${oc.env:NAME} or leave it unset.")
    hub_private_repo: bool | None = Field(None, description="Create the repository private; default: the account's "
                                          "default.")
    hub_always_push: bool = Field(False, description="Push every save; default: a save made while a push is still "
                              "running is skipped (the next one carries the newer model), as transformers does.")
    hub_endpoint: str | None = Field(None, description="Hub address, e.g. a private mirror; default: HF_ENDPOINT or "
                                     "https://huggingface.co.")

    @field_validator("hub_model_id")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if v is not None:
            try:
                validate_repo_id(v)
            except HFValidationError as e:
                raise ValueError(f"not a hub repository id ({str(e).strip().splitlines()[0]}); write owner/name or "
                                 "name") from None
        return v

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (v in ("", ".", "..") or any(c in v for c in "/\\\0")):
            raise ValueError("a run name is a plain name, not a path (trackers make a folder of it inside "
                             "output_dir): no /, \\, '..' or '.'; use e.g. job-42")
        return v

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"unknown schedule {v!r}{did_you_mean(v, SCHEDULERS)}; "
                             f"choose from {', '.join(SCHEDULERS)}")
        return v

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        from alignkit.engine.optim import optimizer_names

        if v not in (names := optimizer_names()):
            raise ValueError(f"unknown optimizer {v!r}{did_you_mean(v, names)}; choose from {', '.join(names)}")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        v = [] if v in (["none"], None) else v
        for name in v if isinstance(v, list) else []:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}{did_you_mean(name, TRACKERS)}; choose from "
                                 f"{', '.join(TRACKERS)}")
        return v

    @model_validator(mode="after")
    def _one_precision(self) -> "TrainConfig":
        if self.bf16 and self.fp16:
            raise ValueError("set train.bf16 or train.fp16, not both")
        return self

    @model_validator(mode="after")
    def _schedule_builds(self) -> "TrainConfig":
        """Build the schedule on a stand-in optimizer, so its mistakes show before any work."""
        import torch
        from transformers import get_scheduler

        if self.lr_scheduler_type == "reduce_lr_on_plateau":
            raise ValueError("train.lr_scheduler_type: reduce_lr_on_plateau steps on an eval metric, which alignkit's "
                             "step-based schedules do not feed it; choose another schedule")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        try:
            scheduler = get_scheduler(self.lr_scheduler_type, optimizer, num_warmup_steps=1, num_training_steps=10,
                                      scheduler_specific_kwargs=dict(self.lr_scheduler_kwargs))
            optimizer.step()
            scheduler.step()
        except Exception as e:  # TypeError for unknown kwargs, ValueError for missing ones
            raise ValueError(f"train.lr_scheduler_kwargs: {dict(self.lr_scheduler_kwargs)} do not fit schedule "
                             f"{self.lr_scheduler_type}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return self



class GenerationConfig(Section):
    """How online methods sample (any method with a rollout): transformers in-process, or vLLM colocated or as a
    server (docs/online.md)."""
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="Sampler of online methods: transformers' generate in each training process, or "
        "vLLM (pip install 'alignkit[vllm]'; see vllm_mode). A method setting that asks for vllm (a rollout's "
        "generation_backend) selects it too.")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: vLLM inside each training process; server: a generation server started "
        "with `alignkit vllm-serve MODEL` at server_host:server_port.")
    server_host: str = Field("127.0.0.1", min_length=1, description="Host of the generation server (server mode).")
    server_port: int = Field(8000, gt=0, lt=65536, description="Port of the generation server (server mode).")
    server_timeout: float = Field(
        240.0, gt=0, description="Seconds any wait on the server may take (health check, generation, each weight "
        "chunk); past it the run ends with one line naming the server and what it waited for.")
    server_chunk_mb: float = Field(64.0, gt=0, description="Weight sync to the server: megabytes of safetensors per "
                                   "request.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="Colocate: fraction of the GPU memory vLLM "
                                          "may take (the rest is the trainer's).")
    enable_sleep_mode: bool = Field(False, description="Colocate: vLLM sleeps (frees its weights and KV cache) "
                                    "between generations, waking before each one.")
    lora_sync: Literal["merged", "adapter"] = Field(
        "merged", description="With model.peft: merged sends the base weights with the LoRA adapters merged in after "
        "every step; adapter sends the base weights once and then only the adapter (vLLM serves it as a LoRA; "
        "`alignkit vllm-serve --enable-lora`).")


class RewardsConfig(Section):
    """Rewards that are not local functions (docs/online.md, "Rewards"): remote ones (`url:http://host:port/path` in
    method.reward_funcs) and LLM judges (`judge:MODEL`)."""
    remote_timeout: float = Field(30.0, gt=0, description="Seconds a url: reward's server may take to answer one "
                                  "request (connect, then each read); past it the request is tried again.")
    remote_retries: int = Field(3, ge=0, description="Tries after the first for a request that got no answer, a "
                                "broken connection, HTTP 429 or 5xx; after the last the run ends with one line "
                                "naming the URL (the last checkpoint stays as it was).")
    remote_backoff: float = Field(1.0, ge=0, description="Seconds before the first retry, doubled before each next.")
    remote_concurrency: int = Field(4, ge=1, description="Requests in flight at once to each url: reward.")
    remote_batch_size: int = Field(64, ge=1, description="Completions per request to a url: reward.")
    judge_template: str | None = Field(
        None, description="A judge: reward's prompt, with {prompt} and {completion}; the judge's next token after it "
        "scores 0-9 (None: alignkit.online.Judge.SCORE_TEMPLATE).")
    judge_pairwise_template: str | None = Field(
        None, description="The pairwise judge's prompt, with {prompt}, {first} and {second}; its next token says A or "
        "B (None: alignkit.online.Judge.PAIR_TEMPLATE).")

    @field_validator("judge_template", "judge_pairwise_template")
    @classmethod
    def _fields_known(cls, value, info):
        if value is None:
            return value
        needed = {"judge_template": {"prompt", "completion"}}.get(info.field_name, {"prompt", "first", "second"})
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as e:
            raise ValueError(f"is not a template ({e}); write literal braces as {{{{ and }}}}") from None
        if used != needed:
            raise ValueError(f"must use exactly the fields {', '.join('{' + f + '}' for f in sorted(needed))}; it "
                             f"uses {', '.join('{' + f + '}' for f in sorted(used)) or 'none'}")
        return value


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    method: MethodConfig
    @model_validator(mode="after")
    def _adapter_sync_needs_an_adapter(self):
        if self.generation.lora_sync == "adapter":
            if self.model.peft is None:
                raise ValueError("generation.lora_sync=adapter needs LoRA adapters (model.peft); without them use "
                                 "generation.lora_sync=merged")
            if self.model.peft.modules_to_save:
                raise ValueError("generation.lora_sync=adapter sends LoRA matrices only; model.peft.modules_to_save "
                                 f"{self.model.peft.modules_to_save} are trained in full: use generation.lora_sync="
                                 "merged")
        return self

    #: dotted key -> the `${oc.env:...}` interpolation it was given as: written files record that, not the value
    _recorded: dict[str, str] = PrivateAttr(default_factory=dict)
    #: this run's random key for the hashes of those values in checkpoints, made at first use (environment_values)
    _salt: str | None = PrivateAttr(None)


@functools.cache
def run_config_class(method_config: type[MethodConfig]) -> type[RunConfig]:
    """RunConfig whose `method` block is validated by the plugin's config model."""
    return create_model(f"{method_config.__name__}Run", __base__=RunConfig, method=(method_config, ...))


def user_layer(config: str | Path | Mapping | None, overrides: Mapping[str, Any] | list[str] | None) -> DictConfig:
    """The YAML file (or dict) with overrides applied: `["a.b=1"]` or `{"a.b": 1}` / `{"a": {"b": 1}}`."""
    if config is None:
        cfg = OmegaConf.create({})
    elif isinstance(config, Mapping):
        cfg = OmegaConf.create(dict(config))
    else:
        cfg = load_yaml(Path(config))
    try:
        if isinstance(overrides, list):
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} must be KEY=VALUE, e.g. train.max_steps=10")
                refuse_tags(item.split("=", 1)[1], f"override {item.split('=', 1)[0]}", positions=False)
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        else:
            for key, value in (overrides or {}).items():
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None
    except TypeError as e:  # a section given as a list or value, merged with its keys
        raise ConfigError(f"bad override: {e}; each of {', '.join(SECTIONS)} is a mapping of keys") from None
    _check_sections(OmegaConf.to_container(cfg, resolve=False), "config")
    return cfg


#: the top-level sections of a config; each is a mapping of keys
SECTIONS = ("model", "data", "train", "generation", "rewards", "method")


def _check_sections(data: dict, where: str) -> None:
    for section in SECTIONS:
        value = data.get(section)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys (e.g. {section}.KEY: VALUE on "
                              f"lines indented below '{section}:'), not a {type(value).__name__}")


def refuse_tags(text: str, where: str, positions: bool = True) -> None:
    """A config is plain data: any YAML tag (!!binary, !!python/..., !custom, even !!str) is refused in one line
    naming `where` (a file: with line and column)."""
    import yaml

    try:
        tokens = list(yaml.scan(text))
    except yaml.YAMLError:  # not valid YAML: the loader reports that, with its position
        return
    for token in tokens:
        if isinstance(token, yaml.TagToken):
            handle, suffix = token.value
            mark = token.start_mark
            at = f"{where}:{mark.line + 1}:{mark.column + 1}" if positions else where
            raise ConfigError(f"{at}: YAML tag {handle or '!<'}{suffix}{'' if handle else '>'} is not allowed: a "
                              "config holds plain strings, numbers, lists and mappings; remove the tag (quote the "
                              "value to make it a string)")


def load_yaml(path: Path) -> DictConfig:
    """A YAML config file; its mistakes as one line with line and column."""
    import yaml

    try:  # omegaconf's loader (duplicate keys are errors, alias expansion bounded); it moved in 2.4
        from omegaconf._yaml import get_yaml_loader
    except ImportError:
        from omegaconf._utils import get_yaml_loader

    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start})") from None
    try:
        refuse_tags(text, str(path))
        data = yaml.load(text, Loader=get_yaml_loader())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = (e.problem or e.context or "not valid YAML").strip()
        lines = text.splitlines()
        if mark and mark.line < len(lines) and lines[mark.line][mark.column:mark.column + 1] == "\t":
            problem = "a tab character; YAML indents with spaces"
        elif problem.startswith("found duplicate key") and e.context_mark:
            problem = f"{problem.replace('found ', '')} (the mapping starts at line {e.context_mark.line + 1})"
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).strip().splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of sections ({', '.join(SECTIONS)}), not a "
                          f"{type(data).__name__}")
    _check_sections(data, str(path))
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None


def _nested(dotted: Mapping[str, Any]) -> DictConfig:
    cfg = OmegaConf.create({})
    for key, value in dotted.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _presets(cfg: DictConfig, method: Method) -> list[DictConfig]:
    """The built-in presets that apply to the config as merged so far."""
    builtin_data = str(OmegaConf.select(cfg, "data.train")).startswith("builtin:")
    builtin_model = str(OmegaConf.select(cfg, "model.name_or_path")).startswith("builtin:")
    no_fraction = OmegaConf.select(cfg, "data.eval_fraction") is None
    presets = [OmegaConf.create(BUILTIN_DATA_PRESET)] if builtin_data and no_fraction else []
    return presets + ([_nested(method.demo_defaults)] if builtin_data and builtin_model else [])


def resolve(method: Method, user: DictConfig) -> RunConfig:
    """Merge the layers for `method`, resolve `${...}`, validate; ConfigError on any mistake."""
    cls = run_config_class(method.config)
    defaults = cls(method={"name": method.name}).model_dump()
    defaults["train"]["output_dir"] = f"outputs/{method.name}"
    demo = {"data.train": f"builtin:{method.demo_data}"} if method.demo_data else {}
    layers = [OmegaConf.create(defaults), _nested(demo), _nested(method.defaults)]
    try:
        layers += _presets(OmegaConf.merge(*layers, user), method)
        merged = OmegaConf.merge(*layers, user)
        plain = OmegaConf.to_container(merged, resolve=True)
        raw = OmegaConf.to_container(merged, resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {str(e).splitlines()[0]}") from None
    try:
        config = cls.model_validate(plain)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, cls)) from None
    config._recorded = env_interpolations(raw, plain)
    return config


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        annotation = cls.model_fields[part].annotation if part in cls.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        cls = annotation
    return list(cls.model_fields)


def _elsewhere(cls: type[BaseModel], loc: tuple) -> str:
    """' (did you mean 'train.learning_rate'?)' for a key given without its section, or in another one."""
    found = [f"{section}.{loc[-1]}" for section in SECTIONS if section != loc[0] and
             loc[-1] in _fields_at(cls, (section,))]
    return f" (did you mean '{found[0]}'?)" if len(found) == 1 else ""


def format_validation_error(e: ValidationError, cls: type[BaseModel]) -> str:
    """One line naming each bad dotted key, the bad value and, for a typo, the closest valid key."""
    parts = []
    for err in e.errors():
        loc = tuple(str(x) for x in err["loc"])
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(cls, loc[:-1])
            hint = did_you_mean(loc[-1], valid) or _elsewhere(cls, loc)
            if not hint and valid:  # no likely typo: name the keys there are
                hint = f" ({'.'.join(loc[:-1]) or 'the config'} has: {', '.join(valid)})"
            parts.append(f"unknown key '{key}'{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if isinstance(err["input"], dict):  # a check across keys: its message names them
                parts.append(msg)
            else:
                parts.append(f"{key}: {msg} (got {err['input']!r})")
    return "; ".join(parts)


def to_yaml(config: RunConfig, comments: bool = True) -> str:
    """The config as YAML that `-c` accepts unchanged, each key preceded by its description. Values that came
    from `${oc.env:...}` are written as that interpolation (see `recorded`)."""
    config = recorded(config)
    lines = []
    for section, value in config:
        lines.append(f"{section}:")
        dumped = value.model_dump(mode="json")
        for name, info in type(value).model_fields.items():
            if comments and info.description:
                lines.append(f"  # {info.description}")
            lines.append(f"  {name}: {json.dumps(dumped.get(name))}")  # a secret (exclude=True) is written null
    return "\n".join(lines) + "\n"


def train_data(config: RunConfig) -> str:
    """data.train, or a one-line ConfigError when neither the user nor the method's demo gives any."""
    if config.data.train is None:
        raise ConfigError(f"data.train: method {config.method.name!r} ships no demo data; give your training data "
                          "with data.train=FILE (.jsonl/.json/.parquet/.csv, a save_to_disk folder or a hub name), "
                          "on the command line or in the config file")
    return config.data.train

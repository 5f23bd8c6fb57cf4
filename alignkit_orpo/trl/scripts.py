"""What TRL v0.15.2's example scripts import besides the trainer: ScriptArguments and ModelConfig (the same
fields and defaults, for HfArgumentParser), get_peft_config, get_quantization_config, get_kbit_device_map
and SIMPLE_CHAT_TEMPLATE ("Role: content" turns separated by blank lines)."""

from dataclasses import dataclass, field

#: "User: ...\n\nAssistant: ...\n\n" with an "Assistant:" generation prompt
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class ScriptArguments:
    """The dataset arguments of TRL's scripts."""

    dataset_name: str = field(metadata={"help": "Dataset name (hub id or local folder)."})
    dataset_config: str | None = field(default=None,
                                       metadata={"help": "Dataset configuration name (`name` of load_dataset)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    gradient_checkpointing_use_reentrant: bool = field(default=False,
                                                       metadata={"help": "use_reentrant for gradient checkpointing."})
    ignore_bias_buffers: bool = field(default=False, metadata={"help": "DDP work-around for boolean bias buffers."})


@dataclass
class ModelConfig:
    """The model arguments of TRL's scripts: model loading, LoRA and k-bit quantization settings."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model to start from."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    torch_dtype: str | None = field(default=None, metadata={"help": "Dtype to load the weights in.",
                                                            "choices": ["auto", "bfloat16", "float16", "float32"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repository to run."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "peft task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling (alpha / sqrt(r))."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8 bits (LoRA only)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (LoRA only)."})
    bnb_4bit_quant_type: str = field(default="nf4",
                                     metadata={"help": "4-bit quantization type.", "choices": ["fp4", "nf4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested 4-bit quantization."})

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("ModelConfig: set load_in_8bit or load_in_4bit, not both")
        if isinstance(self.lora_target_modules, list) and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]  # one name: peft matches it as a pattern


def get_peft_config(model_args: ModelConfig):
    """A peft LoraConfig from the LoRA fields (None without use_peft)."""
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("ModelConfig.use_peft needs the peft package: pip install peft") from None
    return LoraConfig(task_type=model_args.lora_task_type, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                      lora_dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules,
                      bias="none", use_rslora=model_args.use_rslora, modules_to_save=model_args.lora_modules_to_save)


def get_quantization_config(model_args: ModelConfig):
    """A transformers BitsAndBytesConfig for load_in_4bit / load_in_8bit (None otherwise)."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=model_args.torch_dtype,
                              bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                              bnb_4bit_quant_storage=model_args.torch_dtype)


def get_kbit_device_map() -> dict[str, int | str] | None:
    """Each process's accelerator for k-bit loading; None on a machine without one."""
    import torch
    from accelerate import PartialState

    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return {"": f"xpu:{PartialState().local_process_index}"}
    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    return None

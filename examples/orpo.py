"""ORPO training script with the command line of TRL v0.15.2's examples/scripts/orpo.py, on alignkit.

The only change a TRL user makes to their script is the import line (`from trl import ...` becomes
`from alignkit_orpo import ...`). Flags are TRL's: ScriptArguments, ORPOConfig and ModelConfig fields.

    # full fine-tuning
    python examples/orpo.py --dataset_name trl-internal-testing/hh-rlhf-helpful-base-trl-style \\
        --model_name_or_path gpt2 --per_device_train_batch_size 4 --max_steps 1000 --learning_rate 8e-6 \\
        --gradient_accumulation_steps 1 --logging_steps 10 --eval_steps 500 --output_dir gpt2-aligned-orpo \\
        --warmup_steps 150 --report_to wandb --bf16 --logging_first_step --no_remove_unused_columns

    # LoRA adapters, RMSprop
    python examples/orpo.py --dataset_name trl-internal-testing/hh-rlhf-helpful-base-trl-style \\
        --model_name_or_path gpt2 --per_device_train_batch_size 4 --max_steps 1000 --learning_rate 8e-5 \\
        --gradient_accumulation_steps 1 --logging_steps 10 --eval_steps 500 --output_dir gpt2-lora-aligned-orpo \\
        --optim rmsprop --warmup_steps 150 --report_to wandb --bf16 --logging_first_step \\
        --no_remove_unused_columns --use_peft --lora_r 16 --lora_alpha 16

Add --push_to_hub to upload the result (model card included) to the Hugging Face Hub.
"""

import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from alignkit_orpo import SIMPLE_CHAT_TEMPLATE, ModelConfig, ORPOConfig, ORPOTrainer, ScriptArguments, get_peft_config


def main() -> None:
    script_args, training_args, model_args = HfArgumentParser(
        (ScriptArguments, ORPOConfig, ModelConfig)).parse_args_into_dataclasses()

    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                 trust_remote_code=model_args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                              trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE

    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    evaluating = training_args.eval_strategy != "no"
    trainer = ORPOTrainer(
        model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if evaluating else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()

    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


if __name__ == "__main__":
    try:
        main()
    except ConnectionError as e:  # e.g. --push_to_hub without network: one line, not a traceback
        sys.exit(f"orpo.py: {e}")

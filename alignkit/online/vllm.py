"""The optional vLLM generation backend (`pip install 'alignkit[vllm]'`), colocated with the policy.

vLLM runs inside each training process on its device (`distributed_executor_backend="external_launcher"`, so
that every process keeps its own engine, as TRL's colocate mode does); after every optimizer step the engine
calls `sync_weights`, which loads the policy's current weights into vLLM's model: LoRA adapters merged into
their base weights for the copy and unmerged again, parameter names as the base model names them. Its results
follow `alignkit.online.generation.GenerationBackend` (token ids per prompt and sample, stop token included).

Not run in alignkit's CI (no GPU there): its interface is tested against a fake backend.
"""

import torch
from vllm import LLM, SamplingParams  # noqa: F401  (ImportError here tells the user to install the extra)

from alignkit.errors import ConfigError
from alignkit.online.generation import base_named_weights


class VLLMBackend:
    def __init__(self, model: torch.nn.Module, tokenizer, process_index: int = 0,
                 gpu_memory_utilization: float = 0.3) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        path = getattr(base.config, "_name_or_path", "") or getattr(base.config, "name_or_path", "")
        if not path or path.startswith("builtin:"):
            raise ConfigError(f"generation backend vllm needs a model vLLM can load (a hub name or a folder), not "
                              f"{path or 'a model object'!r}; use generation_backend=transformers")
        self.llm = LLM(model=path, tokenizer=tokenizer.name_or_path, dtype=str(base.dtype).split(".")[-1],
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                       distributed_executor_backend="external_launcher", seed=process_index)
        self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        peft = hasattr(model, "merge_adapter")
        if peft:
            model.merge_adapter()
        try:
            runner_model.load_weights(list(base_named_weights(model)))
        finally:
            if peft:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        params = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k or -1, stop_token_ids=stop_token_ids, seed=seed % (2**31))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return [[list(c.token_ids) for c in out.outputs] for out in outputs]

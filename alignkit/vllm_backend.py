"""The optional vLLM generation backend (`pip install 'alignkit[vllm]'`), colocated with the policy.

vLLM runs in the training process on the same device; after every optimizer step the engine calls
`sync_weights`, which loads the policy's current weights into vLLM's model. Its results follow
`alignkit.generation.GenerationBackend` (token ids per prompt and sample, stop token included).
"""

import torch
from vllm import LLM, SamplingParams  # noqa: F401  (ImportError here tells the user to install the extra)


class VLLMBackend:
    def __init__(self, model: torch.nn.Module, tokenizer, gpu_memory_utilization: float = 0.3) -> None:
        self.llm = LLM(model=model.config.name_or_path, tokenizer=tokenizer.name_or_path, dtype=str(model.dtype).split(".")[-1],
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        state = model.get_base_model().state_dict() if hasattr(model, "get_base_model") else model.state_dict()
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(state.items())
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        params = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k or -1, stop_token_ids=stop_token_ids, seed=seed % (2**31))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return [[list(c.token_ids) for c in out.outputs] for out in outputs]

"""vLLM (`pip install 'alignkit[vllm]'`): the colocated backend, and the engine `alignkit vllm-serve --engine vllm`
serves.

Colocate (`generation.backend=vllm`, `generation.vllm_mode=colocate`): vLLM runs inside each training process on its
device (`distributed_executor_backend="external_launcher"`: every process keeps its own engine, as TRL's colocate
mode does) and takes `generation.gpu_memory_utilization` of the GPU. After every optimizer step the engine calls
`sync_weights`, which loads the policy's weights into vLLM's model (LoRA adapters merged for the copy). With
`generation.enable_sleep_mode` vLLM sleeps (level 2: weights and KV cache freed) outside generation, so training
has the memory: before each generation it wakes, gets the current weights again, samples and sleeps.

Sampling: each prompt gets its own seed, from (seed, its tokens, its repeat index) as the transformers backend
derives them, so completions do not depend on how prompts are batched (vLLM's own sampler, so not the same tokens
as transformers').

Not run in alignkit's CI (no GPU, no vLLM there): this module stays small; everything around it (the server and its
client, the config, the CLI) is tested on CPU with the transformers engine.
"""

import json

import torch
from vllm import LLM, SamplingParams

from alignkit.errors import ConfigError
from alignkit.online.generation import mix_seed
from alignkit.online.vllm_client import merged_weights


def model_path(model: torch.nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = getattr(base.config, "_name_or_path", "") or getattr(base.config, "name_or_path", "")
    if not path or path.startswith("builtin:"):
        raise ConfigError(f"generation.backend=vllm needs a model vLLM can load (a hub name or a folder), not "
                          f"{path or 'a model object'!r}; use generation.backend=transformers, or "
                          "generation.vllm_mode=server with `alignkit vllm-serve MODEL --engine transformers`")
    return path


class AdapterFolders:
    """LoRA adapters written where vLLM reads them: one folder per sync (vLLM caches an adapter by its id)."""

    def __init__(self) -> None:
        import tempfile

        self.root, self.count, self.request = tempfile.TemporaryDirectory(prefix="alignkit-lora-"), 0, None

    def write(self, config: dict, weights: dict) -> None:
        import json
        import shutil
        from pathlib import Path

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        old = Path(self.root.name, str(self.count))
        self.count += 1
        folder = Path(self.root.name, str(self.count))
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config, default=sorted))
        save_file(weights, folder / "adapter_model.safetensors")
        self.request = LoRARequest(f"policy-{self.count}", self.count, str(folder))
        shutil.rmtree(old, ignore_errors=True)


def vllm_generate(llm, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed,
                  lora_request=None):
    seen: dict[tuple, int] = {}
    params = []
    for ids in prompt_ids:  # one seed per prompt (and repeat), as TransformersBackend
        key = tuple(ids)
        seen[key] = seen.get(key, -1) + 1
        params.append(SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k or -1, stop_token_ids=list(stop_token_ids),
                                     seed=mix_seed(seed, key, seen[key]) % 2**31))
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False,
                           lora_request=lora_request)
    return [[list(c.token_ids) for c in out.outputs] for out in outputs]


def load_into(llm, named) -> None:
    llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(named)
    llm.reset_prefix_cache()


class VLLMBackend:
    """Colocated vLLM (a GenerationBackend)."""

    def __init__(self, model: torch.nn.Module, tokenizer, process_index: int = 0, settings=None) -> None:
        self.model = model  # unwrapped: a sleeping engine gets the weights again before it samples
        self.sleep = bool(settings and settings.enable_sleep_mode)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.adapters = AdapterFolders() if getattr(settings, "lora_sync", "merged") == "adapter" else None
        lora = {"enable_lora": True, "max_lora_rank": model.peft_config[model.active_adapter].r} \
            if self.adapters else {}
        self.llm = LLM(model=model_path(model), tokenizer=tokenizer.name_or_path,
                       dtype=str(base.dtype).split(".")[-1],
                       gpu_memory_utilization=settings.gpu_memory_utilization if settings else 0.3,
                       enable_prefix_caching=True, enable_sleep_mode=self.sleep,
                       distributed_executor_backend="external_launcher", seed=process_index, **lora)
        if self.sleep:
            self.llm.sleep(level=2)
        self.asleep = self.sleep

    def sync_weights(self, model: torch.nn.Module) -> None:
        if self.asleep:
            return  # level 2 discarded the weights: the next generate loads the current ones
        if self.adapters is not None:  # the base weights are vLLM's own (from the same path); the adapter each step
            from alignkit.online.vllm_client import adapter_payload

            config, weights = adapter_payload(model)
            self.adapters.write(json.loads(config), weights)
            self.llm.reset_prefix_cache()
            return
        with merged_weights(model) as named:
            load_into(self.llm, list(named))

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self.asleep = False
            self.sync_weights(self.model)
            self.llm.wake_up(tags=["kv_cache"])
        try:
            return vllm_generate(self.llm, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids,
                                 seed, self.adapters.request if self.adapters else None)
        finally:
            if self.sleep:
                self.llm.sleep(level=2)
                self.asleep = True


class VLLMEngine:
    """What `alignkit vllm-serve MODEL` serves by default (alignkit.online.vllm_server.ServerEngine)."""

    name = "vllm"

    def __init__(self, model_name: str, dtype: str = "auto", tokenizer_name: str | None = None,
                 gpu_memory_utilization: float = 0.9, trust_remote_code: bool = False, seed: int = 0,
                 max_lora_rank: int = 0) -> None:
        import os

        # one process, the model in it (as colocate): load_weights reaches it directly
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "29531"}.items():
            os.environ.setdefault(key, value)
        self.llm = LLM(model=model_name, tokenizer=tokenizer_name or model_name, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                       distributed_executor_backend="external_launcher", trust_remote_code=trust_remote_code,
                       seed=seed, **({"enable_lora": True, "max_lora_rank": max_lora_rank} if max_lora_rank else {}))
        self.adapters = AdapterFolders() if max_lora_rank else None

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        return vllm_generate(self.llm, prompts, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed,
                             self.adapters.request if self.adapters else None)

    def load_adapter(self, config: dict, weights: dict[str, torch.Tensor]) -> None:
        from alignkit.online.vllm_server import RequestError

        if self.adapters is None:
            raise RequestError("/update_adapter: this server was started without --max-lora-rank (vLLM serves LoRA "
                               "adapters only when enabled); restart it with --max-lora-rank R (R >= model.peft.r)")
        self.adapters.write(config, weights)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(
            [(k, v.cuda()) for k, v in weights.items()])

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

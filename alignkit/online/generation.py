"""The generation handle online methods sample with (`StepContext.generator`), and its backends.

`Generator.generate(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed)` takes
care of what a rollout should not: the policy is unwrapped from its distributed wrapper, put in eval mode
(and back), sampled with the KV cache, with its LoRA adapters on, and under FSDP its sharded parameters are
gathered for the duration. All completions of a call are sampled together (left-padded, in batches of up to
`max_batch_rows`), each from its own generator seeded by (the run's seed, `seed`, the prompt's tokens, the sample's
index) (alignkit.online.sampling), so the completions do not depend on how prompts are batched or split over
processes, and a resumed run samples exactly what the uninterrupted one did.

The handle samples the policy by default, and any other model the run loaded under its name: `model="reference"`
(the reference or teacher, `model.ref_name_or_path`, when the loss needs one; with LoRA and no explicit reference,
the policy with its adapters disabled), or a model a rollout adds itself with `add_model(name, model)`.
`generator.for_model(name)` is the same handle bound to one of them. Other models are always sampled with
transformers' `generate` (the seeds, eval mode and parameter gathering as for the policy).

Prompts with images (a vision-language policy): `images=` one entry per prompt, the row's image features as the
prompt-only formatter made them (`pixel_values`, ... as lists; empty for a prompt without images); the transformers
backend collates them for each batch of rows it samples, each prompt's images repeated for its `n` completions, and
passes them to `generate` with the ids, never sampling the processor's image token (a completion holding one would
ask for an image the row does not have). A backend without `accepts_images` (vLLM) refuses them.

The default backend is transformers' `generate`. Another backend (e.g. vLLM, `pip install alignkit[vllm]`)
implements `GenerationBackend`: `generate(...)` with the same arguments and result, and `sync_weights(model)`,
which the engine calls after every optimizer step so that the backend samples from the current policy.
"""

import contextlib
import hashlib
from typing import Protocol

import torch

from alignkit.errors import ConfigError, PluginError
from alignkit.online.sampling import sample

#: completions of each prompt: [prompt][sample] -> token ids (the stop token included when one was sampled)
Completions = list[list[list[int]]]


class GenerationBackend(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, stop_token_ids: list[int], seed: int) -> Completions: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


def mix_seed(*parts) -> int:
    """A 63-bit seed from any hashable parts, the same in every process and every Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module):
    """Sharded (FSDP, ZeRO-3) parameters gathered on every rank while generating; nothing to do otherwise."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # a torch without distributed support
        FSDP = None
    if FSDP is not None and isinstance(model, FSDP):
        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield
    elif hasattr(model, "unshard") and hasattr(model, "set_reshard_after_forward"):  # FSDP2 (fully_shard)
        # Gather every group once and keep it gathered through all of generate's forwards: the ranks
        # sample different numbers of tokens, so no forward may run a collective.
        groups = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
        for m in groups:
            m.unshard()
        model.set_reshard_after_forward(False)
        try:
            yield
        finally:
            model.set_reshard_after_forward(True)
            for m in groups:
                m.reshard()
    elif any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 (not tested here: no DeepSpeed)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


def base_named_weights(model: torch.nn.Module):
    """(name, tensor) of the policy's weights under the base model's own names, for a backend that keeps its own
    copy: a PEFT model's adapters must be merged first (its LoRA matrices are skipped, modules_to_save renamed)."""
    peft_prefix = getattr(model, "prefix", None) if hasattr(model, "get_base_model") else None
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if (peft_prefix and peft_prefix in name) or "original_module" in name or name.startswith("v_head."):
            continue  # LoRA matrices, the frozen copy of a module trained in full, a value head (not the generator's)
        yield name.replace("modules_to_save.default.", ""), param.data


def check_images_backend(name: str, settings, source: str) -> None:
    """A ConfigError when prompt rows with images would be sampled by vLLM (`name`: the rollout's generation_backend,
    `settings`: the run's `generation` block or None): only transformers' generate reads them here."""
    if "vllm" in (name, getattr(settings, "backend", None)):
        key = "method.generation_backend" if name == "vllm" else "generation.backend"
        raise ConfigError(f"{key}=vllm: {source} has rows with images, and the vLLM backend does not sample prompts "
                          "with images here; use transformers (the default) or drop the 'images' column")


class TransformersBackend:
    """transformers' `generate` on the policy itself (no weights to sync)."""

    #: prompts with images are sampled with their image features (`generate(..., images=, collate=)`)
    accepts_images = True

    def __init__(self, model: torch.nn.Module, unwrap, pad_token_id: int, adapters_off: bool = False,
                 max_batch_rows: int = 256) -> None:
        self.model, self.unwrap, self.pad_token_id = model, unwrap, pad_token_id
        self.adapters_off = adapters_off  # sample the PEFT model's base (the implicit reference)
        self.max_batch_rows = max_batch_rows  # completions per generate call (memory against speed)

    def sync_weights(self, model: torch.nn.Module) -> None:
        pass

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed, images=None,
                 collate=None, suppress=()) -> Completions:
        """`images`: one entry of image features per prompt (or None), collated per batch of rows by `collate`;
        `suppress`: token ids never sampled."""
        policy = self.unwrap(self.model)
        was_training = policy.training
        policy.eval()
        rows, seeds, seen = [], [], {}
        for ids in prompt_ids:
            key = tuple(ids)
            seen[key] = seen.get(key, -1) + 1  # a repeated prompt gets its own samples
            rows += [ids] * n
            seeds += [mix_seed(seed, key, seen[key], j) for j in range(n)]
        pictures = None if images is None else [f for f in images for _ in range(n)]
        device = next(policy.parameters()).device
        try:
            with full_parameters(self.model), torch.no_grad(), \
                    (policy.disable_adapter() if self.adapters_off else contextlib.nullcontext()):
                flat = []
                for start in range(0, len(rows), self.max_batch_rows):
                    stop = start + self.max_batch_rows
                    extra = {} if pictures is None else {k: v.to(device) for k, v in
                                                         collate(pictures[start:stop]).items()}
                    flat += sample(policy, rows[start:stop], seeds[start:stop], max_new_tokens, temperature, top_p,
                                   top_k, stop_token_ids, self.pad_token_id, suppress=suppress, **extra)
        finally:
            policy.train(was_training)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


POLICY = "policy"


class Generator:
    """The handle the engine puts in `StepContext.generator` for methods with a rollout stage."""

    def __init__(self, model: torch.nn.Module, accelerator, tokenizer, seed: int,
                 backend: GenerationBackend | None = None) -> None:
        self.model, self.accelerator, self.tokenizer, self.seed = model, accelerator, tokenizer, seed
        self.backend = backend or TransformersBackend(model, accelerator.unwrap_model, tokenizer.pad_token_id)
        self.backends: dict[str, GenerationBackend] = {POLICY: self.backend}
        self._vision = None  # the processor's image collation, built when prompts with images first come

    @property
    def models(self) -> list[str]:
        """The names `generate(model=...)` and `for_model` accept: "policy" first, then the others loaded."""
        return list(self.backends)

    def add_model(self, name: str, model: torch.nn.Module, adapters_off: bool = False) -> None:
        """Make `model` sampleable as `model=name` (e.g. a teacher a rollout loads itself); `adapters_off`: sample a
        PEFT model with its adapters disabled."""
        if not isinstance(name, str) or not name or name == POLICY:
            raise PluginError(f"generator.add_model: {name!r} is not a free model name (not {POLICY!r}, not empty)")
        self.backends[name] = TransformersBackend(model, self.accelerator.unwrap_model, self.tokenizer.pad_token_id,
                                                  adapters_off)

    def for_model(self, name: str) -> "BoundGenerator":
        """This handle bound to one model: `for_model("reference").generate(prompt_ids, ...)`."""
        self._backend(name)
        return BoundGenerator(self, name)

    def _backend(self, name: str) -> GenerationBackend:
        if name not in self.backends:
            raise PluginError(f"generator: no model {name!r} to sample; loaded: {', '.join(self.backends)} (a method "
                              "gets \"reference\" when its loss needs a reference model, e.g. model.ref_name_or_path)")
        return self.backends[name]

    @contextlib.contextmanager
    def scoring(self, name: str = POLICY):
        """The model named `name` (see `models`) to run a forward on without gradient, e.g. a rollout's log-probs
        under the reference: unwrapped from its distributed wrapper with its sharded parameters gathered (so no
        forward runs a collective: the processes may run different numbers of them), for the implicit reference
        the PEFT policy with its adapters disabled, for the duration. The caller sets no_grad (a rollout runs under
        it)."""
        model = self.model if name == POLICY else self._backend(name).model
        off = name != POLICY and getattr(self._backend(name), "adapters_off", False)
        inner = self.accelerator.unwrap_model(model)
        with full_parameters(model), (inner.disable_adapter() if off else contextlib.nullcontext()):
            yield inner

    def generate(self, prompt_ids: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids: list[int] | None = None,
                 seed: int = 0, model: str = POLICY, images: list[dict] | None = None) -> Completions:
        """`n` completions of each prompt (token ids without padding), sampled reproducibly from `seed`, from the
        policy or the loaded model named `model` (see `models`); `images`: each prompt's image features (see the
        module's docstring)."""
        backend = self._backend(model)
        stop = list(stop_token_ids) if stop_token_ids is not None else [self.tokenizer.eos_token_id]
        args = ([list(map(int, p)) for p in prompt_ids], n, max_new_tokens, temperature, top_p, top_k, stop,
                mix_seed(self.seed, seed))
        if images is None or not any(v for f in images for v in f.values()):
            return backend.generate(*args)
        if not getattr(backend, "accepts_images", False):
            raise ConfigError(f"generation: the {type(backend).__name__} backend does not sample prompts with images; "
                              "use generation.backend=transformers")
        processor = self.vision().processor
        suppress = [t for t in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
                    if isinstance(t, int)]
        return backend.generate(*args, images=images, collate=self.vision().collate, suppress=suppress)

    def vision(self):
        """The image collation of the policy's processor (alignkit.formatters.vision.VisionRows)."""
        if self._vision is None:
            from alignkit.formatters.vision import VisionRows, processor_of

            processor = processor_of(self.tokenizer)
            if processor is None:
                raise ConfigError("generation: prompts with images need a vision-language model (its processor)")
            self._vision = VisionRows(processor)
        return self._vision

    def sync_weights(self) -> None:
        """After an optimizer step: the backend samples from the updated policy."""
        self.backend.sync_weights(self.accelerator.unwrap_model(self.model))


class BoundGenerator:
    """`Generator.for_model(name)`: `generate(...)` samples that model."""

    def __init__(self, generator: Generator, name: str) -> None:
        self.generator, self.name = generator, name

    def generate(self, prompt_ids: list[list[int]], **kwargs) -> Completions:
        return self.generator.generate(prompt_ids, **kwargs, model=self.name)


def backend_for(name: str, model, accelerator, tokenizer, settings=None) -> GenerationBackend | None:
    """The policy's backend: None (transformers' generate, the default) unless `name` (the rollout's
    `generation_backend`) or `settings` (the run's `generation` block) says "vllm"; then vLLM colocated (the
    optional extra) or the generation server's client, as `settings.vllm_mode` says."""
    if name not in ("transformers", "vllm"):
        raise ConfigError(f"generation backend {name!r} is not known; choose transformers or vllm")
    if settings is None:
        from alignkit.config import GenerationConfig

        settings = GenerationConfig()
    if "vllm" not in (name, settings.backend):
        return None
    if settings.vllm_mode == "server":
        from alignkit.online.vllm_client import ServerBackend

        return ServerBackend(model, accelerator, settings)
    try:
        from alignkit.online.vllm import VLLMBackend
    except ImportError as e:
        raise ConfigError(f"generation.backend=vllm (colocate) needs vLLM: pip install 'alignkit[vllm]' ({e}); or "
                          "use generation.vllm_mode=server with a server started by `alignkit vllm-serve`") from None
    return VLLMBackend(accelerator.unwrap_model(model), tokenizer, accelerator.process_index, settings)

"""GRPO's data: the core's prompt-only rows; for the built-in demo, a supervised warm-up of the model first."""

import hashlib
import inspect
import logging
import os
import sys
from pathlib import Path

import torch

from alignkit import cache_dir
from alignkit.blocks.demo import sft_warmup, sft_warmup_conversations
from alignkit.formatters import PromptOnlyFormatter

log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    return cache_dir("grpo-warmup")


def _versions() -> str:
    """alignkit's and this plugin's versions (a cache from another version of either is not reused)."""
    import importlib.metadata

    import alignkit

    try:
        plugin = importlib.metadata.version("alignkit-grpo")
    except importlib.metadata.PackageNotFoundError:
        plugin = ""
    return f"{alignkit.__version__}:{plugin}"


def _fingerprint(model, steps: int, extra: str = "") -> str:
    """The warm-up's cache key: the versions, the source of the warm-up code (this module, and the core's demo module:
    its data and warm-up), the model class, the steps and the starting weights."""
    from alignkit.blocks import demo

    h = hashlib.sha256(f"{_versions()}:{type(model).__name__}:{steps}{extra}".encode())
    for module in (sys.modules[__name__], demo):
        h.update(inspect.getsource(module).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class GRPOFormatter(PromptOnlyFormatter):
    """`prompt` rows (standard or conversational) with every other column kept for the rewards; rows with `images`
    for a vision-language model (their pixel values go through generation and every log-prob forward)."""

    reads_images = True

    def check_data(self, dataset, source: str, pm=None, run=None) -> None:
        """The data has every column the configured rewards read, and each reward function returns what the
        rollout accepts (alignkit.online.rewards.check_data); rows with images are not sampled by vLLM: refused
        here, before anything is written."""
        from alignkit import get_plugin_manager
        from alignkit.formatters.vision import holds_images
        from alignkit.online.generation import check_images_backend
        from alignkit.online.rewards import MODEL_PREFIX, RewardRegistry, check_data

        if holds_images(dataset):
            check_images_backend(self.config.generation_backend, getattr(run, "generation", None), source)

        names = [n for n in self.config.reward_funcs if not n.startswith(MODEL_PREFIX)]
        check_data(RewardRegistry.from_plugins(pm or get_plugin_manager()).select(names), dataset, source)

    def _episodes(self):
        """(worked episodes, tool schemas, source digest) of the configured environment when it offers
        `demonstrations()` (the calculator does), else None (the sorting demo's warm-up)."""
        name = getattr(self.config, "environment", None)
        if not name:
            return None
        from alignkit import get_plugin_manager
        from alignkit.online.environments import EnvironmentRegistry

        spec = EnvironmentRegistry.from_plugins(get_plugin_manager()).select(name, self.config.environment_options)
        demos = getattr(spec.factory, "demonstrations", None)
        if demos is None:
            return None
        source = hashlib.sha256(inspect.getsource(sys.modules[spec.factory.__module__]).encode()).hexdigest()[:16]
        return demos(), getattr(spec.build(), "tool_schemas", None) or None, source

    def prepare_model(self, model) -> None:
        """With method.sft_warmup_steps (the demo sets it): that many supervised steps on the demo task before
        RL, cached (under $XDG_CACHE_HOME/alignkit/grpo-warmup) by the starting weights, the warm-up code and the
        versions, so a second run starts at once and another version never reuses the result."""
        steps = getattr(self.config, "sft_warmup_steps", 0)
        if not steps:
            return
        from safetensors.torch import load_file, save_file

        episodes = self._episodes()  # a multi-turn demo: the environment's worked episodes (and its source)
        extra = "" if episodes is None else f":{self.config.environment}:{episodes[2]}"
        path = _cache_dir() / f"{_fingerprint(model, steps, extra)}.safetensors"
        if path.is_file():
            model.load_state_dict(load_file(str(path)), strict=False)
            log.info("demo warm-up: loaded the supervised start from %s", path)
            return
        with torch.random.fork_rng():
            if episodes is None:
                sft_warmup(model, self.tokenizer, steps)
            else:
                sft_warmup_conversations(model, self.tokenizer, episodes[0], steps, tools=episodes[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp))
        tmp.replace(path)

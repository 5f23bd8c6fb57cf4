"""The server backend: an online method samples from a generation server (`alignkit vllm-serve MODEL`,
alignkit.online.vllm_server) at generation.server_host:server_port.

- Before training (when the backend is built, before the run writes anything) the server's health is checked: a
  server that does not answer, or speaks another protocol version, ends the run in one line naming host:port.
- The policy's weights are sent before the first generation and after every optimizer step, as safetensors chunks
  of generation.server_chunk_mb each, then the server's prefix cache is reset. LoRA adapters: with
  generation.lora_sync=merged (the default) they are merged into their base weights for the copy (and unmerged
  again), and the server receives full weights under the base model's names; with generation.lora_sync=adapter the
  base weights go once, at the first sync, and every sync after sends only the adapter (its config and LoRA
  matrices, peft's names: a fraction of the bytes), which the server applies as a LoRA adapter. With several
  training processes the main process sends them (sharded parameters are gathered on every process for it) and the
  others wait for its outcome.
- Every wait (connecting, sending, the answer) is bounded by generation.server_timeout seconds; past it, a refused
  or dropped connection, an error answer, or an answer of the wrong shape end the run with one
  `GenerationServerError` line naming the server and what it waited for: never a hang. The step that met it
  changed no checkpoint, so the last one stays intact and resumable.
"""

import contextlib
import http.client
import json
import time

import torch

from alignkit.errors import AlignkitError
from alignkit.online.generation import Completions, base_named_weights, full_parameters
from alignkit.online.vllm_server import HEADER, PROTOCOL


class GenerationServerError(AlignkitError):
    """The generation server did not answer in time, went away, refused a request or answered nonsense."""


@contextlib.contextmanager
def merged_weights(model: torch.nn.Module):
    """(name, tensor) of the policy's weights as the base model names them, LoRA adapters merged in for the
    duration (and unmerged after)."""
    peft = hasattr(model, "merge_adapter")
    if peft:
        model.merge_adapter()
    try:
        yield base_named_weights(model)
    finally:
        if peft:
            model.unmerge_adapter()


def adapter_payload(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """A PEFT model's active adapter: its config as JSON and its weights under peft's saved names."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[model.active_adapter].to_dict()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return json.dumps(config, default=sorted), weights


def chunks(named, limit_bytes: int):
    """The named tensors in groups of at most `limit_bytes` (a larger tensor is a group of its own)."""
    group, size = {}, 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > limit_bytes:
            yield group
            group, size = {}, 0
        group[name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    if group:
        yield group


class ServerClient:
    """The HTTP calls, each bounded by `timeout` seconds in all."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    @property
    def server(self) -> str:
        return f"generation server {self.host}:{self.port}"

    def request(self, method: str, path: str, what: str, body: bytes | None = None, json_body=None):
        """The JSON answer; GenerationServerError naming the server and `what` (what we waited for) otherwise."""
        headers = {HEADER: str(PROTOCOL)}
        if json_body is not None:
            body, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        deadline = time.monotonic() + self.timeout
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.connect()
            conn.sock.settimeout(max(deadline - time.monotonic(), 1e-3))  # sending counts against the same limit
            conn.request(method, path, body=body, headers=headers)
            conn.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            response = conn.getresponse()
            data = self._read(conn, response, deadline)
        except TimeoutError:
            raise GenerationServerError(f"{self.server} did not answer within {self.timeout:g} s (generation."
                                        f"server_timeout) while waiting for {what}") from None
        except ConnectionRefusedError:
            raise GenerationServerError(f"{self.server}: nothing listens there (connection refused) while waiting "
                                        f"for {what}; start it with `alignkit vllm-serve MODEL --host {self.host} "
                                        f"--port {self.port}` or set generation.server_host/server_port") from None
        except (OSError, http.client.HTTPException) as e:
            raise GenerationServerError(f"{self.server} closed the connection while we waited for {what} "
                                        f"({type(e).__name__}: {e or 'no answer'}); did it stop?") from None
        finally:
            conn.close()
        try:
            answer = json.loads(data)
        except ValueError:
            raise GenerationServerError(f"{self.server} answered {what} with HTTP {response.status} and "
                                        f"{len(data)} bytes that are not JSON; is it an alignkit vllm-serve server?"
                                        ) from None
        if response.status != 200:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise GenerationServerError(f"{self.server} refused {what} (HTTP {response.status}): "
                                        f"{message or 'no error message'}")
        if not isinstance(answer, dict):
            raise GenerationServerError(f"{self.server} answered {what} with a JSON {type(answer).__name__}, not an "
                                        "object")
        return answer

    def _read(self, conn, response, deadline: float) -> bytes:
        parts = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if conn.sock is not None:
                conn.sock.settimeout(left)
            part = response.read(1 << 20)
            if not part:
                return b"".join(parts)
            parts.append(part)

    def health(self) -> dict:
        answer = self.request("GET", "/health", "the health check")
        if answer.get("protocol") != PROTOCOL:
            raise GenerationServerError(f"{self.server} speaks protocol {answer.get('protocol')!r}, this alignkit "
                                        f"{PROTOCOL}: run the same alignkit version on both sides")
        return answer

    def update_weights(self, named, chunk_bytes: int) -> int:
        from safetensors.torch import save

        sent = 0
        for i, group in enumerate(chunks(named, chunk_bytes)):
            self.request("POST", "/update_weights", f"the weight update (chunk {i + 1}, {len(group)} tensors)",
                         body=save(group))
            sent += len(group)
        self.request("POST", "/reset_prefix_cache", "the prefix-cache reset after the weight update")
        return sent

    def update_adapter(self, config_json: str, weights: dict[str, torch.Tensor]) -> int:
        """Send a LoRA adapter (one request: adapters are small), then reset the prefix cache."""
        from safetensors.torch import save

        self.request("POST", "/update_adapter", f"the adapter update ({len(weights)} tensors)",
                     body=save(weights, metadata={"adapter_config": config_json}))
        self.request("POST", "/reset_prefix_cache", "the prefix-cache reset after the adapter update")
        return len(weights)

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed) -> Completions:
        what = f"completions of {len(prompt_ids)} prompts x {n}"
        answer = self.request("POST", "/generate", what, json_body={
            "prompts": prompt_ids, "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "stop_token_ids": list(stop_token_ids), "seed": seed})
        completions = answer.get("completions")
        problem = shape_problem(completions, len(prompt_ids), n, max_new_tokens)
        if problem:
            raise GenerationServerError(f"{self.server} answered {what} with the wrong shape: {problem}")
        return completions


def shape_problem(completions, prompts: int, n: int, max_new_tokens: int) -> str | None:
    """What is wrong with an answer that should be [prompts][n] lists of at most max_new_tokens token ids."""
    if not isinstance(completions, list):
        return f"'completions' is {type(completions).__name__}, not a list"
    if len(completions) != prompts:
        return f"{len(completions)} groups for {prompts} prompts"
    for i, group in enumerate(completions):
        if not isinstance(group, list) or len(group) != n:
            return f"prompt {i} got {len(group) if isinstance(group, list) else type(group).__name__} samples, not {n}"
        for sample in group:
            if not isinstance(sample, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                       for t in sample):
                return f"prompt {i}: a sample that is not a list of token ids"
            if len(sample) > max_new_tokens:
                return f"prompt {i}: a sample of {len(sample)} tokens, more than max_new_tokens={max_new_tokens}"
    return None


class ServerBackend:
    """A GenerationBackend sampling through the generation server (`generation.vllm_mode=server`)."""

    def __init__(self, model: torch.nn.Module, accelerator, settings) -> None:
        self.model, self.accelerator = model, accelerator  # the prepared (wrapped) policy
        self.client = ServerClient(settings.server_host, settings.server_port, settings.server_timeout)
        self.chunk_bytes = int(settings.server_chunk_mb * 2**20)
        self.adapter_only = getattr(settings, "lora_sync", "merged") == "adapter"
        self.client.health()  # before the run writes anything
        self._synced = False  # the weights are sent before the first generation (a resumed run's, by then)

    def sync_weights(self, model: torch.nn.Module) -> None:
        problem = None
        with full_parameters(self.model):
            if self.accelerator.is_main_process:
                try:
                    self._send(model)
                except GenerationServerError as e:
                    problem = str(e)
        problem = self._everyone(problem)
        if problem:
            raise GenerationServerError(problem)
        self._synced = True

    def _send(self, model: torch.nn.Module) -> None:
        if not self.adapter_only:
            with merged_weights(model) as named:
                self.client.update_weights(named, self.chunk_bytes)
            return
        if not self._synced:  # the base once (unmerged: the adapter is applied on top of it by the server)
            self.client.update_weights(base_named_weights(model), self.chunk_bytes)
        self.client.update_adapter(*adapter_payload(model))

    def _everyone(self, problem: str | None) -> str | None:
        """The main process's outcome on every process (the others must not wait for a sync that failed)."""
        if self.accelerator.num_processes == 1:
            return problem
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([problem], from_process=0)[0]

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed) -> Completions:
        if not self._synced:
            self.sync_weights(self.accelerator.unwrap_model(self.model))
        return self.client.generate(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed)

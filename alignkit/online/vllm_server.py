"""The generation server `alignkit vllm-serve MODEL` starts: an HTTP API over an engine that samples.

The request handling here knows nothing of how tokens are sampled: an engine does (`ServerEngine`). With vLLM
(`--engine vllm`, on a GPU) it is `alignkit.online.vllm.VLLMEngine`; with transformers (`--engine transformers`,
on any machine) it is `TransformersEngine`, which samples exactly as the in-process transformers backend does (the
same seeds per prompt), so a run through the server and one without it give the same completions.

The API (protocol version `PROTOCOL`; every request carries it in the `X-Alignkit-Protocol` header, and every
error comes back as JSON `{"error": message}` with a 4xx/5xx status):

  GET  /health              -> {"status": "ok", "protocol", "engine", "model"}
  POST /generate            JSON {prompts: [[ids]], n, max_new_tokens, temperature, top_p, top_k, stop_token_ids,
                            seed} -> {"completions": [prompt][sample] -> ids} (the stop token included)
  POST /update_weights      body: safetensors bytes of some of the policy's named weights (a sync is several
                            such chunks; the names are the base model's) -> {"loaded": count}
  POST /update_adapter      body: safetensors bytes of a LoRA adapter's weights (peft's names), its peft config as
                            JSON in the metadata key "adapter_config" -> {"loaded": count}; generations after it
                            apply the adapter on the base weights (generation.lora_sync=adapter)
  POST /reset_prefix_cache  -> {"status": "ok"} (after a sync: cached prefixes were computed with the old weights)
  POST /close               -> {"status": "closing"}; the server stops

Weights travel in the request body (safetensors over HTTP: simple, works on any machine, about the speed of the
network). vLLM's own servers broadcast them over NCCL from the trainer's GPU, the GPU-speed path for large models;
it is not implemented here.
"""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import torch

from alignkit.online.generation import Completions, TransformersBackend

log = logging.getLogger(__name__)

PROTOCOL = 1
HEADER = "X-Alignkit-Protocol"
#: the sampling fields of a /generate request and their types
GENERATE_FIELDS = {"prompts": list, "n": int, "max_new_tokens": int, "temperature": (int, float), "top_p": (int, float),
                   "top_k": int, "stop_token_ids": list, "seed": int}


class ServerEngine(Protocol):
    """What samples behind the server."""

    name: str

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, stop_token_ids: list[int], seed: int) -> Completions: ...

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def load_adapter(self, config: dict, weights: dict[str, torch.Tensor]) -> None: ...

    def reset_prefix_cache(self) -> None: ...


class TransformersEngine:
    """transformers' generate on a model in this process: what `--engine transformers` serves (CPU or GPU)."""

    name = "transformers"

    def __init__(self, model: torch.nn.Module, pad_token_id: int) -> None:
        self.model, self.adapter = model, None
        self.backend = TransformersBackend(model, lambda m: m, pad_token_id)

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed) -> Completions:
        return self.backend.generate(prompts, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise RequestError(f"the served model has no weight {', '.join(unknown[:5])}"
                               f"{' ...' if len(unknown) > 5 else ''} (is it the policy's architecture?)")
        wrong = [f"{k} {tuple(v.shape)} (served: {tuple(own[k].shape)})" for k, v in weights.items()
                 if v.shape != own[k].shape]
        if wrong:
            raise RequestError(f"weights of another shape: {', '.join(wrong[:5])}")
        with torch.no_grad():
            for name, value in weights.items():
                own[name].copy_(value)

    def load_adapter(self, config: dict, weights: dict[str, torch.Tensor]) -> None:
        """The first adapter wraps the served model with it (peft); later ones replace its weights."""
        import peft

        if self.adapter is None:
            try:
                lora = peft.LoraConfig(**{k: v for k, v in config.items() if k in peft.LoraConfig.__dataclass_fields__
                                          and k not in ("peft_type", "task_type", "base_model_name_or_path")})
            except (TypeError, ValueError) as e:
                raise RequestError(f"/update_adapter: not a LoRA config ({e})") from None
            self.adapter = peft.get_peft_model(self.model, lora)
            self.backend.model = self.adapter
        own = peft.get_peft_model_state_dict(self.adapter)
        unknown = sorted(set(weights) - set(own))
        wrong = [k for k in weights if k in own and weights[k].shape != own[k].shape]
        if unknown or wrong or set(own) - set(weights):
            raise RequestError(f"/update_adapter: the adapter does not fit the served one (unknown {unknown[:3]}, "
                               f"other shapes {wrong[:3]}, missing {sorted(set(own) - set(weights))[:3]})")
        peft.set_peft_model_state_dict(self.adapter, weights)

    def reset_prefix_cache(self) -> None:
        pass  # transformers keeps no cache between calls


class RequestError(ValueError):
    """A request the server refuses (answered with 400 and the message)."""


def safetensors_metadata(body: bytes) -> dict:
    """The `__metadata__` of safetensors bytes (8 bytes of header length, then the JSON header)."""
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + size]).get("__metadata__") or {}


def check_generate(request) -> dict:
    """The /generate request's fields, checked (RequestError naming the field otherwise)."""
    if not isinstance(request, dict):
        raise RequestError("a /generate request is a JSON object")
    missing = [k for k in GENERATE_FIELDS if k not in request]
    if missing:
        raise RequestError(f"/generate: missing {', '.join(missing)}")
    for key, kind in GENERATE_FIELDS.items():
        if not isinstance(request[key], kind) or isinstance(request[key], bool):
            raise RequestError(f"/generate: {key} is a {type(request[key]).__name__}")
    for key in ("prompts", "stop_token_ids"):
        rows = request[key] if key == "prompts" else [request[key]]
        if not all(isinstance(r, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in r)
                   for r in rows):
            raise RequestError(f"/generate: {key} must hold lists of token ids (non-negative integers)")
    if request["n"] < 1 or request["max_new_tokens"] < 1 or not request["prompts"] or not all(request["prompts"]):
        raise RequestError("/generate: n and max_new_tokens must be >= 1, and prompts non-empty token lists")
    return {k: request[k] for k in GENERATE_FIELDS}


class GenerationServer(ThreadingHTTPServer):
    """The HTTP server around `engine`; one engine call at a time (generation and weight loading never overlap)."""

    daemon_threads = True

    def __init__(self, engine: ServerEngine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "",
                 handler: type[BaseHTTPRequestHandler] | None = None) -> None:
        self.engine, self.model_name, self.lock = engine, model_name, threading.Lock()
        super().__init__((host, port), handler or Handler)

    @property
    def address(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"

    def close_soon(self) -> None:
        threading.Thread(target=self.shutdown, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    server: GenerationServer

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(self._routes_get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._routes_post)

    @property
    def _routes_get(self) -> dict:
        return {"/health": self.health}

    @property
    def _routes_post(self) -> dict:
        return {"/generate": self.generate, "/update_weights": self.update_weights,
                "/update_adapter": self.update_adapter, "/reset_prefix_cache": self.reset_prefix_cache,
                "/close": self.close}

    def _answer(self, routes: dict) -> None:
        try:
            body = self._body()
            version = self.headers.get(HEADER)
            if version != str(PROTOCOL):
                raise RequestError(f"protocol version {version or 'missing'} ({HEADER} header); this server speaks "
                                   f"{PROTOCOL}: use the same alignkit version on both sides")
            if self.path not in routes:
                raise RequestError(f"no endpoint {self.command} {self.path}; there are {', '.join(routes)}")
            status, answer = 200, routes[self.path](body)
        except RequestError as e:
            status, answer = 400, {"error": str(e)}
        except Exception as e:  # the engine failed: the client shows the message
            log.exception("generation server: %s %s failed", self.command, self.path)
            status, answer = 500, {"error": f"{type(e).__name__}: {e}"}
        data = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped waiting (its timeout): nothing to do
            log.info("generation server: the client of %s %s left before the answer", self.command, self.path)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, body: bytes):
        try:
            return json.loads(body or b"{}")
        except ValueError as e:
            raise RequestError(f"{self.path}: the body is not JSON ({e})") from None

    def health(self, body: bytes) -> dict:
        return {"status": "ok", "protocol": PROTOCOL, "engine": self.server.engine.name,
                "model": self.server.model_name}

    def generate(self, body: bytes) -> dict:
        request = check_generate(self._json(body))
        with self.server.lock:
            return {"completions": self.server.engine.generate(
                request["prompts"], request["n"], request["max_new_tokens"], float(request["temperature"]),
                float(request["top_p"]), request["top_k"], request["stop_token_ids"], request["seed"])}

    def update_weights(self, body: bytes) -> dict:
        from safetensors.torch import load

        try:
            weights = load(body)
        except Exception as e:
            raise RequestError(f"/update_weights: the body is not safetensors ({e})") from None
        with self.server.lock:
            self.server.engine.load_weights(weights)
        return {"loaded": len(weights)}

    def update_adapter(self, body: bytes) -> dict:
        from safetensors.torch import load

        try:
            weights, meta = load(body), safetensors_metadata(body)
            config = json.loads(meta["adapter_config"])
        except Exception as e:
            raise RequestError(f"/update_adapter: the body is not safetensors with an adapter_config ({e})") from None
        if not isinstance(config, dict):
            raise RequestError("/update_adapter: adapter_config is not a JSON object")
        with self.server.lock:
            self.server.engine.load_adapter(config, weights)
        return {"loaded": len(weights)}

    def reset_prefix_cache(self, body: bytes) -> dict:
        with self.server.lock:
            self.server.engine.reset_prefix_cache()
        return {"status": "ok"}

    def close(self, body: bytes) -> dict:
        self.server.close_soon()
        return {"status": "closing"}


"""The generation server (`alignkit vllm-serve`, generation.vllm_mode=server) on CPU: the real server code with the
transformers engine, in a thread on 127.0.0.1, stands in for vLLM. A GRPO run through it samples what an in-process
run samples; a server that never answers, answers late, dies mid-sync or answers the wrong shape ends the run in one
line naming it, within the timeout, and the last checkpoint stays intact."""

import contextlib
import http.client
import json
import socket
import sys
import threading
import time

import alignkit_grpo
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import alignkit
from alignkit.cli.commands import cli
from alignkit.cli.vllm_serve import transformers_engine
from alignkit.engine import checkpoint
from alignkit.online.vllm_client import chunks
from alignkit.online.vllm_server import HEADER, PROTOCOL, GenerationServer, Handler
from alignkit.testing import plugin_manager, tiny_model
from helpers import fast, free_port, read_jsonl, refused, write_jsonl

#: the tiny model's weights at server_chunk_mb=0.25
CHUNKS_PER_SYNC = len(list(chunks(tiny_model().named_parameters(), int(0.25 * 2**20))))
PROMPTS = [{"prompt": f"sort: {i} {(i * 3) % 7} {(i * 5) % 9} =", "max_chars": 6} for i in range(16)]


class Recording:
    """The transformers engine, with every call recorded: ("load", names) / ("reset",) / ("generate", prompts)."""

    def __init__(self, engine) -> None:
        self.engine, self.name, self.calls = engine, "transformers", []

    def generate(self, prompts, *args):
        self.calls.append(("generate", len(prompts)))
        return self.engine.generate(prompts, *args)

    def load_weights(self, weights):
        self.calls.append(("load", sorted(weights)))
        self.engine.load_weights(weights)

    def load_adapter(self, config, weights):
        self.calls.append(("adapter", sorted(weights)))
        self.engine.load_adapter(config, weights)

    def reset_prefix_cache(self):
        self.calls.append(("reset",))

    def events(self) -> str:
        """S: a whole sync (its chunks then the cache reset), G: a generation."""
        text = "".join({"load": "l", "adapter": "l", "reset": "S", "generate": "G"}[c[0]] for c in self.calls)
        return text.replace("l", "")


@contextlib.contextmanager
def serving(engine, handler=Handler):
    server = GenerationServer(engine, "127.0.0.1", 0, model_name="builtin:tiny", handler=handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        if getattr(engine, "release", None):
            engine.release.set()
        assert server.lock.acquire(timeout=10)  # no engine call outlives the test (a late answer, a silent one)
        time.sleep(0.05)  # its answer written


def grpo_config(tmp_path, port=None, timeout=5.0, name="out", **train) -> dict:
    config = fast(tmp_path, **train)
    config["train"]["output_dir"] = str(tmp_path / name)
    config["data"] = {"train": write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)}
    config["method"] = {"num_generations": 4, "max_completion_length": 8, "sft_warmup_steps": 0,
                        "reward_funcs": ["length-penalty"]}
    config["train"]["learning_rate"] = 1e-2
    if port is not None:
        config["generation"] = {"backend": "vllm", "vllm_mode": "server", "server_port": port,
                                "server_timeout": timeout, "server_chunk_mb": 0.25}
    return config


def run(config):
    return alignkit.run("grpo", config, plugins=plugin_manager(alignkit_grpo))


def test_a_grpo_run_through_the_server_samples_and_learns_as_one_without_it(tmp_path):
    engine = Recording(transformers_engine("builtin:tiny", seed=123))  # other initial weights: the sync replaces them
    with serving(engine) as server:
        served = run(grpo_config(tmp_path, server.server_address[1], max_steps=3, name="served"))
    alone = run(grpo_config(tmp_path, max_steps=3, name="alone"))
    rows_served, rows_alone = read_jsonl(tmp_path / "served" / "metrics.jsonl"), read_jsonl(tmp_path / "alone" /
                                                                                             "metrics.jsonl")
    assert rows_served == rows_alone and len(rows_alone) == 3
    assert any(r["grad_norm"] > 0 for r in rows_alone)  # the weights changed: the syncs mattered
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("served", "alone")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert served.global_step == 3 and served.metrics == alone.metrics
    # the weights before the first generation and after every optimizer step, then the cache reset
    assert engine.events() == "SG" + "SG" + "SG" + "S", engine.calls
    loads = [c[1] for c in engine.calls if c[0] == "load"]
    assert len(loads) > 4  # chunked (server_chunk_mb=0.25)
    first_sync = [n for names in loads[:len(loads) // 4] for n in names]
    assert sorted(first_sync) == sorted(dict(engine.engine.model.named_parameters()))  # every weight, once


def test_lora_weights_are_merged_for_the_sync(tmp_path):
    engine = Recording(transformers_engine("builtin:tiny"))
    with serving(engine) as server:
        config = grpo_config(tmp_path, server.server_address[1], max_steps=1)
        config["model"] = {"peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
        run(config)
    names = {n for c in engine.calls if c[0] == "load" for n in c[1]}
    assert names == set(dict(engine.engine.model.named_parameters()))  # the base model's names, no lora_A/B


class Silent:
    """A port that accepts connections and never answers."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def one_line_exit_2(config, within: float) -> str:
    args = ["-q", "run", "--method", "grpo", *(f"{s}.{k}={json.dumps(v)}" for s, keys in config.items()
                                               for k, v in keys.items())]
    start = time.monotonic()
    result = CliRunner().invoke(cli, args)
    assert time.monotonic() - start < within
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("alignkit: error: generation server 127.0.0.1:"), result.stderr
    return lines[0]


@pytest.fixture
def grpo_entry_point(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit,alignkit-grpo")


@pytest.mark.parametrize("server", ["nothing", "silent", "other-protocol"])
def test_the_health_check_refuses_before_anything_is_written(tmp_path, grpo_entry_point, server):
    class OtherProtocol(Handler):
        def health(self, body):
            return {**super().health(body), "protocol": PROTOCOL + 1}

    with contextlib.ExitStack() as stack:
        if server == "nothing":
            port = free_port()
        elif server == "silent":
            port = stack.enter_context(Silent())
        else:
            port = stack.enter_context(serving(transformers_engine("builtin:tiny"), OtherProtocol)).server_address[1]
        config = grpo_config(tmp_path, port, timeout=0.5, max_steps=2)
        line = one_line_exit_2(config, within=30)
    assert f"127.0.0.1:{port}" in line
    assert {"nothing": "connection refused", "silent": "did not answer within 0.5 s",
            "other-protocol": f"speaks protocol {PROTOCOL + 1}"}[server] in line, line
    assert "health check" in line or server == "other-protocol"
    assert not (tmp_path / "out").exists()


class Faulty(Recording):
    """Misbehaves from the `at`-th generation on: never answers, answers late, or the wrong shape."""

    def __init__(self, engine, fault: str, at: int, timeout: float) -> None:
        super().__init__(engine)
        self.fault, self.at, self.timeout, self.release = fault, at, timeout, threading.Event()

    def generate(self, prompts, n, *args):
        out = super().generate(prompts, n, *args)
        if not self.fault or sum(c[0] == "generate" for c in self.calls) < self.at:
            return out
        if self.fault == "silent":
            self.release.wait(60)
        elif self.fault == "late":
            time.sleep(self.timeout + 1)
        return [group[:-1] for group in out]  # wrong shape (also what the late and silent answer would be)


def dying_handler(after_chunks: int):
    """A server that dies in the middle of a weight sync: the connection dropped unanswered, the server gone."""
    seen = []

    class Dying(Handler):
        def _answer(self, routes):
            if self.path == "/update_weights":
                seen.append(1)
                if len(seen) > after_chunks:  # no answer, and no more server
                    self.server.close_soon()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            super()._answer(routes)

    return Dying


@pytest.mark.parametrize("fault", ["silent", "late", "dies", "shape"])
def test_a_server_failing_mid_run_ends_it_in_one_line_and_keeps_the_last_checkpoint(tmp_path, grpo_entry_point,
                                                                                      fault):
    timeout = 1.0
    engine = Faulty(transformers_engine("builtin:tiny"), fault if fault != "dies" else "", at=3, timeout=timeout)
    chunks_per_sync = CHUNKS_PER_SYNC
    handler = dying_handler(2 * chunks_per_sync + 1) if fault == "dies" else Handler  # in the sync after step 1
    with serving(engine, handler) as server:
        config = grpo_config(tmp_path, server.server_address[1], timeout=timeout, max_steps=4, save_steps=1)
        line = one_line_exit_2(config, within=40)
    assert f"127.0.0.1:{server.server_address[1]}" in line
    expected = {"silent": "did not answer within 1 s", "late": "did not answer within 1 s",
                "dies": "closed the connection while we waited for the weight update",
                "shape": "wrong shape: prompt 0 got 3 samples, not 4"}[fault]
    assert expected in line, line
    if fault != "dies":
        assert "completions of 4 prompts x 4" in line
        assert len([c for c in engine.calls if c[0] == "load"]) == 3 * chunks_per_sync
    root = tmp_path / "out" / "checkpoints"
    kept = sorted(p.name for p in root.iterdir())
    assert kept == (["checkpoint-1"] if fault == "dies" else ["checkpoint-1", "checkpoint-2"])
    assert all(checkpoint.verify(root / name) is None for name in kept)


def test_a_run_resumes_from_the_checkpoint_a_dead_server_left(tmp_path, grpo_entry_point):
    with serving(transformers_engine("builtin:tiny"), dying_handler(2 * CHUNKS_PER_SYNC + 1)) as server:
        one_line_exit_2(grpo_config(tmp_path, server.server_address[1], timeout=1, max_steps=3, save_steps=1),
                        within=40)
    with serving(transformers_engine("builtin:tiny")) as server:
        config = grpo_config(tmp_path, server.server_address[1], max_steps=3, save_steps=1)
        config["train"]["resume_from_checkpoint"] = "auto"
        assert run(config).global_step == 3
    run(grpo_config(tmp_path, max_steps=3, save_steps=1, name="alone"))
    resumed, alone = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "alone"))
    assert all(torch.equal(resumed[k], alone[k]) for k in alone)


def call(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={HEADER: str(PROTOCOL), **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_the_api_answers_errors_as_json_naming_the_problem():
    with serving(transformers_engine("builtin:tiny")) as server:
        port = server.server_address[1]
        status, answer = call(port, "GET", "/health", headers={HEADER: "0"})
        assert status == 400 and "protocol version 0" in answer["error"]
        assert call(port, "GET", "/health") == (200, {"status": "ok", "protocol": PROTOCOL, "engine": "transformers",
                                                       "model": "builtin:tiny"})
        good = {"prompts": [[5, 6, 7]], "n": 2, "max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "stop_token_ids": [2], "seed": 7}
        status, answer = call(port, "POST", "/generate", json.dumps(good))
        assert status == 200 and len(answer["completions"]) == 1 and len(answer["completions"][0]) == 2
        assert call(port, "POST", "/generate", json.dumps(good))[1] == answer  # the seed decides
        status, answer = call(port, "POST", "/generate", json.dumps({**good, "n": "two"}))
        assert status == 400 and "n is a str" in answer["error"]
        status, answer = call(port, "POST", "/generate", json.dumps({k: v for k, v in good.items() if k != "seed"}))
        assert status == 400 and "missing seed" in answer["error"]
        from safetensors.torch import save

        status, answer = call(port, "POST", "/update_weights", save({"lm_head.bias": torch.zeros(3)}))
        assert status == 400 and "no weight lm_head.bias" in answer["error"]
        status, answer = call(port, "POST", "/update_weights", b"not safetensors")
        assert status == 400 and "not safetensors" in answer["error"]
        status, answer = call(port, "POST", "/update_adapter", save({"x": torch.zeros(3)}))
        assert status == 400 and "not safetensors with an adapter_config" in answer["error"]
        lora = json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
        status, answer = call(port, "POST", "/update_adapter", save({"nope.lora_A.weight": torch.zeros(2, 3)},
                                                                    metadata={"adapter_config": lora}))
        assert status == 400 and "does not fit the served one" in answer["error"]
        status, answer = call(port, "POST", "/nowhere")
        assert status == 400 and "no endpoint POST /nowhere" in answer["error"]
        assert call(port, "POST", "/reset_prefix_cache") == (200, {"status": "ok"})


def test_vllm_serve_serves_until_closed(tmp_path):
    port = free_port()
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=CliRunner().invoke(
        cli, ["vllm-serve", "builtin:tiny", "--engine", "transformers", "--port", str(port)])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert call(port, "GET", "/health")[1]["engine"] == "transformers"
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert call(port, "POST", "/close") == (200, {"status": "closing"})
    thread.join(30)
    assert result["r"].exit_code == 0, result["r"].output


def test_vllm_serve_without_vllm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed: its import fails
    assert "needs vLLM" in refused("vllm-serve", "builtin:tiny")


@pytest.mark.parametrize("key, value, expected", [
    ("generation.backend", "sglang", "generation.backend"), ("generation.vllm_mode", "remote", "colocate"),
    ("generation.server_port", "70000", "generation.server_port"),
    ("generation.server_timeout", "0", "generation.server_timeout"),
    ("generation.gpu_memory_utilization", "1.5", "generation.gpu_memory_utilization"),
    ("generation.sever_port", "1", "did you mean 'server_port'"),
])
def test_a_bad_generation_setting_is_one_line(tmp_path, grpo_entry_point, key, value, expected):
    out = tmp_path / "out"
    assert expected in refused("run", "--method", "grpo", f"train.output_dir={out}", f"{key}={value}", written=out)


def test_grpo_method_generation_backend_still_selects_vllm(tmp_path):
    with serving(Recording(transformers_engine("builtin:tiny"))) as server:
        config = grpo_config(tmp_path, server.server_address[1], max_steps=1)
        config["generation"].pop("backend")
        config["method"]["generation_backend"] = "vllm"
        run(config)
        assert "G" in server.engine.events()


def test_generation_settings_for_a_method_that_samples_nothing_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit")
    out = tmp_path / "out"
    line = refused("run", "--method", "orpo", f"train.output_dir={out}", "generation.backend=vllm", written=out)
    assert "generation.backend" in line and "orpo" in line and "samples nothing" in line


def test_a_generation_section_that_is_not_a_mapping_is_one_line(tmp_path, grpo_entry_point):
    config = tmp_path / "c.yaml"
    config.write_text("generation: vllm\n")
    out = tmp_path / "out"
    line = refused("run", "--method", "grpo", "-c", config, f"train.output_dir={out}", written=out)
    assert "'generation'" in line and "mapping" in line


def test_lora_adapter_sync_sends_the_base_once_then_only_the_adapter_and_samples_as_merged(tmp_path):
    """generation.lora_sync=adapter: the same completions and metrics as the merged sync, a fraction of the bytes."""
    engines = {mode: Recording(transformers_engine("builtin:tiny", seed=123)) for mode in ("merged", "adapter")}
    for mode, engine in engines.items():
        with serving(engine) as server:
            config = grpo_config(tmp_path, server.server_address[1], max_steps=3, name=mode)
            config["model"] = {"peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
            config["generation"]["lora_sync"] = mode
            config["train"]["learning_rate"] = 5e-2
            run(config)
    merged, adapter = (read_jsonl(tmp_path / m / "metrics.jsonl") for m in ("merged", "adapter"))
    assert len(merged) == 3 and any(r["grad_norm"] > 0 for r in merged)
    for a, b in zip(adapter, merged):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (a, b)
    calls = engines["adapter"].calls
    base_loads = [c for c in calls if c[0] == "load"]
    adapter_loads = [c for c in calls if c[0] == "adapter"]
    # the base weights once (before the first generation), then an adapter before every generation and at the end
    assert {n for c in base_loads for n in c[1]} == set(dict(tiny_model().named_parameters()))
    assert calls.index(base_loads[-1]) < calls.index(adapter_loads[0])
    assert len(adapter_loads) == 4 and all(n.endswith(("lora_A.weight", "lora_B.weight")) for c in adapter_loads
                                           for n in c[1])
    assert len(adapter_loads[0][1]) == 2 * 2 * tiny_model().config.num_hidden_layers  # q and v, A and B


def test_adapter_sync_without_an_adapter_is_one_line(tmp_path, grpo_entry_point):
    with Silent() as port:
        config = grpo_config(tmp_path, port)
        config["generation"]["lora_sync"] = "adapter"
        args = ["-q", "run", "--method", "grpo", *(f"{s}.{k}={json.dumps(v)}" for s, keys in config.items()
                                                   for k, v in keys.items())]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "generation.lora_sync=adapter needs LoRA adapters (model.peft)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()

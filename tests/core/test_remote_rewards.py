"""Remote rewards (issue 24, items 3 and 5): `url:http://host:port/path` in method.reward_funcs posts the batch as
JSON to a server and reads one reward per completion back, with bounded concurrency, a timeout and retries with
backoff; after the last retry the run ends with one line naming the URL, its last checkpoint intact. Tested against
a stand-in server on 127.0.0.1 (http.server in a thread)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import alignkit
from alignkit.config import RewardsConfig
from alignkit.errors import AlignkitError
from alignkit.online.remote_rewards import RemoteReward, RemoteRewardError
from alignkit.online.rewards import RewardRegistry, call_reward, score
from helpers import read_jsonl, refused

PROMPTS = [f"sort: {i} {i + 2} {i + 1} =" for i in range(8)]
COMPLETIONS = ["1 2 3", "", "x", "4 5", "long completion here", "7", "8 9", "99"]
COLUMNS = {"answer": ["1 2 3", "2", "x", "4 5 6", "no", "7", "9 8", "99"], "level": list(range(8))}
FAST = {"remote_timeout": 0.5, "remote_retries": 2, "remote_backoff": 0.01}


def local(prompts, completions, answer, **kw):
    """What the stand-in server computes: None for an empty completion, else a match score and a length term."""
    return [None if not c else float(c == a) + len(c) / 100 for c, a in zip(completions, answer)]


class Server:
    """A reward server on 127.0.0.1 whose behaviour a test sets: `mode` for every request, or `plan`, a list of
    modes for the next requests (then `mode`)."""

    def __init__(self):
        self.mode, self.plan, self.bodies, self.in_flight, self.most_in_flight = "ok", [], [], 0, 0
        self.delay, self.lock, self.stop = 0.0, threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append((self.path, body))
                    mode = server.plan.pop(0) if server.plan else server.mode
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                self.counted = True
                try:
                    self.answer(mode, body)
                finally:
                    self.done()

            def done(self):
                """Out of flight once the answer is ready, before it is sent: the client may send its next request
                as soon as it reads this one (counting after the send saw 4 of 3 now and then)."""
                if self.counted:
                    self.counted = False
                    with server.lock:
                        server.in_flight -= 1

            def answer(self, mode, body):
                if mode == "never":
                    server.stop.wait(30)
                    return
                if mode == "late":
                    time.sleep(1.0)
                time.sleep(server.delay)
                rewards = local(body["prompts"], body["completions"], **body["columns"])
                payload = {"ok": {"rewards": rewards}, "late": {"rewards": rewards}, "list": rewards,
                           "short": {"rewards": rewards[:-1]}, "words": {"rewards": ["high"] * len(rewards)},
                           "nan": {"rewards": [float("nan")] * len(rewards)}}.get(mode)
                status = {"500": 500, "404": 404, "notjson": 200}.get(mode, 200)
                data = b"<html>oops</html>" if payload is None else json.dumps(payload).encode()
                self.done()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"url:http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def remote(server, **settings):
    return [(server.url, RewardRegistry(settings=RewardsConfig(**{**FAST, **settings})).select([server.url])[0][1])]


def nan_as(x, v=-1.0):
    return x.nan_to_num(v).tolist()


@pytest.mark.parametrize("mode", ["ok", "list"])  # {"rewards": [...]} or the bare list
def test_remote_scores_equal_the_local_function(server, mode):
    server.mode = mode
    out = score(remote(server, remote_batch_size=3), PROMPTS, COMPLETIONS, COLUMNS)
    expected = score([("local", local)], PROMPTS, COMPLETIONS, COLUMNS)
    assert nan_as(out) == nan_as(expected) and bool(out[1, 0].isnan())
    assert len(server.bodies) == 3  # 8 completions, 3 per request
    path, first = server.bodies[0] if server.bodies[0][1]["prompts"][0] == PROMPTS[0] else \
        next(b for b in server.bodies if b[1]["prompts"][0] == PROMPTS[0])
    assert path == "/score"
    assert first == {"prompts": PROMPTS[:3], "completions": COMPLETIONS[:3],
                     "columns": {"answer": COLUMNS["answer"][:3], "level": [0, 1, 2]}}


def test_requests_in_flight_are_bounded(server):
    server.delay = 0.15
    start = time.perf_counter()
    out = score(remote(server, remote_batch_size=1, remote_concurrency=3), PROMPTS, COMPLETIONS, COLUMNS)
    took = time.perf_counter() - start
    assert server.most_in_flight == 3 and len(server.bodies) == 8
    assert took < 8 * 0.15 * 0.75, took  # concurrently: 3 rounds of 0.15 s, not 8
    assert nan_as(out) == nan_as(score([("local", local)], PROMPTS, COMPLETIONS, COLUMNS))


def test_a_server_that_fails_then_answers_is_retried(server):
    server.plan = ["500", "500"]
    out = score(remote(server), PROMPTS, COMPLETIONS, COLUMNS)
    assert nan_as(out) == nan_as(score([("local", local)], PROMPTS, COMPLETIONS, COLUMNS))
    assert len(server.bodies) == 3


def test_a_late_answer_is_retried_and_then_accepted(server):
    server.plan = ["late"]
    out = score(remote(server), PROMPTS, COMPLETIONS, COLUMNS)
    assert nan_as(out) == nan_as(score([("local", local)], PROMPTS, COMPLETIONS, COLUMNS))
    assert len(server.bodies) == 2


@pytest.mark.parametrize("mode, said, tries", [
    ("never", "did not answer within 0.5 s", 3),
    ("late", "did not answer within 0.5 s", 3),
    ("500", "answered HTTP 500", 3),
    ("404", "answered HTTP 404", 1),  # a client error is not retried
    ("short", "answered 7 rewards for 8 completions", 1),
    ("words", "answered 'high' for completion 0", 1),
    ("nan", "answered nan for completion 0", 1),
    ("notjson", "answered something that is not JSON", 1),
])
def test_failures_are_one_line_naming_the_url(server, mode, said, tries):
    server.mode = mode
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError) as e:
        score(remote(server), PROMPTS, COMPLETIONS, COLUMNS)
    message = str(e.value)
    assert server.url.removeprefix("url:") in message and said in message and "\n" not in message, message
    assert len(server.bodies) == tries
    if tries > 1:
        assert f"{tries} tries" in message and "rewards.remote_retries" in message, message
    assert time.perf_counter() - start < 5


def test_nothing_listening_is_retried_then_one_line(server):
    url = server.url
    server.close()
    with pytest.raises(RemoteRewardError, match="connection refused") as e:
        call_reward(url, RemoteReward(url, RewardsConfig(**FAST)), PROMPTS[:1], COMPLETIONS[:1], {"answer": ["1"]})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("url, said", [
    ("url:ftp://127.0.0.1/score", "must start with http:// or https://"),
    ("url:127.0.0.1:8000/score", "must start with http:// or https://"),
    ("url:http:///score", "has no host"),
    ("url:http://127.0.0.1:port/score", "port"),
])
def test_a_url_that_is_not_http_is_refused_in_one_line_before_any_write(tmp_path, url, said):
    out = tmp_path / "out"
    line = refused("run", "-m", "grpo", f"train.output_dir={out}", f"method.reward_funcs=[{url}]",
                   "method.sft_warmup_steps=0", "train.max_steps=1", written=out)
    assert "method.reward_funcs" in line and url in line and said in line, line


def test_unknown_rewards_settings_are_refused(tmp_path):
    out = tmp_path / "out"
    line = refused("run", "-m", "grpo", f"train.output_dir={out}", "rewards.remote_timout=3", written=out)
    assert "rewards.remote_timout" in line and "remote_timeout" in line, line
    line = refused("run", "-m", "grpo", f"train.output_dir={out}", "rewards.remote_retries=-1", written=out)
    assert "rewards.remote_retries" in line, line


def _grpo(out, server, **extra):
    alignkit.run("grpo", **{
        "method.num_generations": 2, "method.max_completion_length": 4, "method.sft_warmup_steps": 0,
        "method.reward_funcs": [server.url], "data.max_train_samples": 8, "train.max_steps": 3,
        "train.per_device_train_batch_size": 2, "train.save_steps": 1, "train.plots": False,
        "train.disable_tqdm": True, "train.logging_steps": 1, "train.output_dir": str(out),
        "train.eval_on_start": False, "train.eval_steps": None, "data.max_eval_samples": 4,
        "rewards.remote_timeout": 0.5, "rewards.remote_retries": 1, "rewards.remote_backoff": 0.01, **extra})


def test_a_grpo_run_whose_server_fails_ends_in_one_line_with_its_last_checkpoint_intact(tmp_path, server):
    out = tmp_path / "out"
    server.plan, server.mode = ["ok"], "500"  # step 1 is scored, step 2 never
    with pytest.raises(RemoteRewardError) as e:
        _grpo(out, server)
    message = str(e.value)
    assert server.url.removeprefix("url:") in message and "HTTP 500" in message and "\n" not in message, message
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1"], checkpoints
    assert not (out / "model.safetensors").exists()
    server.mode = "ok"  # the server is back: the run resumes from that checkpoint (waiting longer) and finishes
    try:
        _grpo(out, server, **{"train.resume_from_checkpoint": "auto", "rewards.remote_timeout": 2.0,
                              "rewards.remote_retries": 3})
    except AlignkitError as e:
        pytest.fail(str(e))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert torch.isfinite(torch.tensor([r[f"rewards/{server.url}/mean"] for r in rows])).all(), rows

"""train.push_to_hub (issue 26): the engine pushes a run to the hub as transformers.Trainer does (hub_strategy),
for every method, in a worker thread, against a local stand-in of the hub's HTTP API on 127.0.0.1 (no network):
every save is pushed while training goes on, a failed push is reported once and the next save pushes again, and
the token reaches the hub only, never a file or a log."""

import base64
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import pytest

import alignkit
from helpers import fast, refused

TOKEN = "hf_StandInSecretToken1234567890"


class HubStandIn:
    """The hub's API as HfApi uses it to create a repository and commit regular files; each commit is recorded as
    (summary, {path: bytes}). `fail` decides from a commit's summary whether to answer 403; `hold` may block a commit
    (e.g. until the run has gone on)."""

    def __init__(self, fail=lambda summary: False, hold=lambda summary: None):
        self.commits, self.failed, self.auth, self.fail, self.hold = [], [], set(), fail, hold
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(404, {"error": "not in the stand-in"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.auth.add(self.headers.get("Authorization"))
                if self.path == "/api/repos/create":
                    asked = json.loads(body)
                    repo = "/".join(filter(None, [asked.get("organization"), asked["name"]]))
                    return self.reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":  # a README.md's metadata, checked before its commit
                    return self.reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in json.loads(body)["files"]]})
                if "/commit/" in self.path:
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    summary = next(x["value"]["summary"] for x in lines if x["key"] == "header")
                    hub.hold(summary)
                    if hub.fail(summary):
                        hub.failed.append(summary)
                        return self.reply(403, {"error": "stand-in refusal"})  # 5xx would be retried for ~20 s
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                             for x in lines if x["key"] == "file"}
                    hub.commits.append((summary, files))
                    oid = f"{len(hub.commits):040x}"
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                self.reply(404, {"error": "not in the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def summaries(self) -> list[str]:
        return [summary for summary, _ in self.commits]


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests' conftest sets it


def push_run(tmp_path, hub, **train):
    settings = {"save_steps": 1, "push_to_hub": True, "hub_model_id": "me/run", "hub_endpoint": hub.url,
                "hub_token": TOKEN, **train}
    return alignkit.run("sft", fast(tmp_path, **settings)).output_dir


def test_every_save_pushes_each_checkpoint_while_training_goes_on(online, tmp_path):
    out = tmp_path / "out"

    def hold(summary):  # step 1's push is held until the run wrote checkpoint-3: a push never blocks training
        if summary.endswith("step 1"):
            deadline = time.monotonic() + 60
            while not (out / "checkpoints" / "checkpoint-3").is_dir() and time.monotonic() < deadline:
                time.sleep(0.02)
            hold.went_on = (out / "checkpoints" / "checkpoint-3").is_dir()

    hub = HubStandIn(hold=hold)
    push_run(tmp_path, hub, hub_always_push=True)
    assert hold.went_on
    assert hub.summaries() == [f"Training in progress, step {n}" for n in (1, 2, 3)] + ["End of training"]
    for summary, files in hub.commits:
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files), summary
        assert not any(p.startswith(("checkpoint", ".")) or "/." in p for p in files), sorted(files)
    end = hub.commits[-1][1]
    assert {"metrics.jsonl", "config.yaml"} <= set(end)
    assert end["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert not (out / ".hub-push").exists()  # the snapshots are gone once pushed


def test_checkpoint_strategy_pushes_last_checkpoint_and_all_checkpoints_each(online, tmp_path):
    hub = HubStandIn()
    push_run(tmp_path / "a", hub, hub_strategy="checkpoint", hub_always_push=True, max_steps=3)
    folders = [{p.split("/")[0] for p in files if "/" in p} for _, files in hub.commits]
    assert folders[1] == {"last-checkpoint"} and folders[3] == {"last-checkpoint"}
    assert "last-checkpoint/alignkit_state.json" in hub.commits[3][1]
    assert json.loads(hub.commits[3][1]["last-checkpoint/alignkit_state.json"])["step"] == 2
    hub = HubStandIn()
    push_run(tmp_path / "b", hub, hub_strategy="all_checkpoints", hub_always_push=True, max_steps=3)
    pushed = {p.split("/")[0] for _, files in hub.commits for p in files if p.startswith("checkpoint-")}
    assert pushed == {"checkpoint-1", "checkpoint-2"}


def test_end_strategy_pushes_once_at_the_end(online, tmp_path):
    hub = HubStandIn()
    push_run(tmp_path, hub, hub_strategy="end")
    assert hub.summaries() == ["End of training"]


def test_a_failed_push_is_reported_once_and_the_next_save_pushes_again(online, tmp_path, caplog):
    hub = HubStandIn(fail=lambda summary: summary.endswith(("step 1", "step 2")))
    with caplog.at_level(logging.INFO):
        out = push_run(tmp_path, hub, hub_always_push=True)
    assert hub.failed and {s for s in hub.failed} == {"Training in progress, step 1", "Training in progress, step 2"}
    assert hub.summaries() == ["Training in progress, step 3", "End of training"]  # training went on to the end
    assert (out / "model.safetensors").is_file()
    reports = [r for r in caplog.records if "failed" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(reports) == 1 and "me/run" in reports[0].getMessage(), [r.getMessage() for r in reports]


def test_the_token_reaches_the_hub_only(online, tmp_path, caplog, capfd):
    hub = HubStandIn(fail=lambda summary: summary.endswith("step 2"))
    with caplog.at_level(logging.DEBUG):
        out = push_run(tmp_path, hub, hub_always_push=True)
    assert hub.auth == {f"Bearer {TOKEN}"}  # the token was used
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaks
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert not any(TOKEN.encode() in content for _, files in hub.commits for content in files.values())
    assert "hub_token: null" in (out / "config.yaml").read_text()


def test_a_bad_hub_strategy_is_one_line(tmp_path):
    line = refused("run", "--method", "sft", "train.push_to_hub=true", "train.hub_strategy=sometimes",
                   f"train.output_dir={tmp_path / 'o'}", written=tmp_path / "o")
    assert "train.hub_strategy" in line and "every_save" in line and "all_checkpoints" in line


def test_a_bad_repository_id_is_one_line(tmp_path):
    line = refused("run", "--method", "sft", "train.push_to_hub=true", "train.hub_model_id=a/b/c",
                   f"train.output_dir={tmp_path / 'o'}", written=tmp_path / "o")
    assert "train.hub_model_id" in line


def test_pushing_while_offline_is_one_line(tmp_path):
    line = refused("run", "--method", "sft", "train.push_to_hub=true", f"train.output_dir={tmp_path / 'o'}",
                   written=tmp_path / "o")
    assert "HF_HUB_OFFLINE" in line

"""Multi-turn rollouts in the shared GroupRollout (GRPO here; RLOO shares it): the exact sampled token ids, the
environment's messages as the chat template renders them, a mask that keeps every environment token out of the loss
and the KL, environment rewards in the advantages, reproducible and batching-independent episodes."""

import alignkit_grpo
import guess_environment
import pytest
import torch
from alignkit_grpo import GRPOLoss

from alignkit.online.generation import Generator
from alignkit.online.rewards import RewardRegistry
from alignkit.plugins import build_registry
from alignkit.testing import plugin_manager, tiny_model, tiny_tokenizer

CALL = '<tool_call>{"name":"calculate","arguments":{"expression":"6*7"}}</tool_call>'


class Ctx:
    def __init__(self, generator, training=True, step=0):
        self.generator, self.training, self.step, self.device = generator, training, step, torch.device("cpu")

    def reduce(self, tensor, op="sum"):
        return tensor.detach().clone()


class NoWrap:
    @staticmethod
    def unwrap_model(model):
        return model


class Scripted:
    """A generator whose model turn t is `turns[t]` for every episode (what it was asked is recorded)."""

    def __init__(self, turns):
        self.turns, self.asked = turns, []

    def generate(self, prompt_ids, n=1, max_new_tokens=0, seed=0, **kw):
        self.asked.append([list(p) for p in prompt_ids])
        turn = self.turns[len(self.asked) - 1]
        return [[list(turn) for _ in range(n)] for _ in prompt_ids]


def rollout(pm=None, method="grpo", **settings):
    import alignkit_rloo

    pm = pm or plugin_manager(alignkit_grpo, alignkit_rloo)
    method = build_registry(pm).get(method)  # its config with the rollout's environment keys
    config = method.config(**{"num_generations": 2, "max_completion_length": 120, "reward_funcs": ["exact-match"],
                              "environment": "calculator", "max_turns": 3, **settings})
    return method.rollout(config, tiny_tokenizer(), rewards=RewardRegistry.from_plugins(pm))


def prompt_batch(prompts, answers):
    tok = tiny_tokenizer()
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    return {"prompt_input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
            "prompt_attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "prompt": list(prompts), "answer": list(answers)}


def spelled(text):
    """`text` one character per token: a tokenization the tokenizer itself would never produce."""
    tok = tiny_tokenizer()
    return [tok.convert_tokens_to_ids(c) for c in text]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_the_completion_is_the_sampled_ids_and_the_templates_rendering_of_the_tool_result(method):
    tok = tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<|end|>")
    first, second = spelled(CALL) + [end], spelled("42") + [end]
    assert first[:-1] != tok(CALL, add_special_tokens=False)["input_ids"]  # re-tokenizing would change them
    gen = Scripted([first, second])
    beta = {"beta": 0.0} if method == "rloo" else {}  # (the KL in RLOO's reward needs a model to score with)
    out = rollout(method=method, **beta)(prompt_batch(["What is 6*7?"], ["42"]), Ctx(gen))
    env = tok("\n<|user|>\n<tool_response>42</tool_response><|end|>\n<|assistant|>\n",
              add_special_tokens=False)["input_ids"]
    expected = first + env + second
    for row in range(2):
        assert out["completion_ids"][row].tolist() == expected
        assert out["completion_mask"][row].tolist() == [1] * len(first) + [0] * len(env) + [1] * len(second)
        assert out["completion_attention_mask"][row].tolist() == [1] * len(expected)
    prompt = out["prompt_ids"][0][out["prompt_mask"][0].bool()].tolist()
    assert tok.decode(prompt).endswith("<|user|>\nWhat is 6*7?<|end|>\n<|assistant|>\n")
    assert "calculate(expression)" in tok.decode(prompt)
    # turn 2 continued exactly the tokens of turn 1 and the environment's reply
    assert gen.asked[1] == [prompt + first + env] * 2
    assert out["rewards"].tolist() == [1.0, 1.0] and out["episode_stats"]["turns"].tolist() == [2.0, 2.0]
    assert out["episode_stats"]["tool_well_formed"].tolist() == [1.0, 1.0]
    assert out["is_truncated"].tolist() == [False, False]


def test_a_turn_without_a_call_ends_the_episode_and_the_token_budget_truncates():
    tok = tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<|end|>")
    out = rollout()(prompt_batch(["What is 6*7?"], ["41"]), Ctx(Scripted([spelled("41") + [end]])))
    assert out["completion_mask"].tolist() == [[1] * 3] * 2 and out["rewards"].tolist() == [1.0, 1.0]
    budget = len(spelled(CALL)) + 5  # the tool result does not fit
    out = rollout(max_completion_length=budget)(prompt_batch(["6*7?"], ["42"]),
                                                 Ctx(Scripted([spelled(CALL) + [end]])))
    assert out["completion_ids"].shape[1] == budget and out["is_truncated"].tolist() == [True, True]
    assert out["completion_mask"][0].tolist() == [1] * (len(CALL) + 1) + [0] * 4


def guess_rollout(**settings):
    return rollout(plugin_manager(alignkit_grpo, guess_environment), environment="guess",
                   environment_options={"secret": 7}, max_completion_length=60, max_turn_length=6, max_turns=3,
                   **settings)


def test_real_episodes_are_reproducible_and_independent_of_batching():
    prompts, answers = ["sort: 3 1 2 =", "sort: 9 8 ="], [" 1 2 3", " 8 9"]
    gen = Generator(tiny_model(), NoWrap(), tiny_tokenizer(), seed=0)
    both = guess_rollout()(prompt_batch(prompts, answers), Ctx(gen, step=3))
    again = guess_rollout()(prompt_batch(prompts, answers), Ctx(gen, step=3))
    alone = [guess_rollout()(prompt_batch([p], [a]), Ctx(gen, step=3)) for p, a in zip(prompts, answers)]
    assert both["episode_stats"]["turns"].max() > 1  # the environment answered at least once
    for key in ("completion_ids", "completion_mask", "completion_attention_mask"):
        assert torch.equal(both[key], again[key])
        for i, one in enumerate(alone):
            width = one[key].shape[1]
            assert torch.equal(both[key][2 * i:2 * i + 2, :width], one[key])
            assert not both[key][2 * i:2 * i + 2, width:].any()
    assert torch.equal(both["rewards_per_func"].nan_to_num(-1), again["rewards_per_func"].nan_to_num(-1))
    assert both["reward_names"] == ["exact-match", "env/hit"]
    other = guess_rollout()(prompt_batch(prompts, answers), Ctx(gen, step=4))
    assert not torch.equal(both["completion_ids"], other["completion_ids"])


@pytest.mark.parametrize("fused", [True, False])
def test_environment_tokens_are_never_trained(fused):
    """Old and reference log-probs at environment positions may be anything: the loss, its KL and every gradient
    are the same; counting those tokens (the mask that would train them) changes the gradients."""
    gen = Generator(tiny_model(), NoWrap(), tiny_tokenizer(), seed=0)
    r, ctx = guess_rollout(), Ctx(gen)
    batch = r.finish([r(prompt_batch(["sort: 3 1 2 =", "sort: 9 8 ="], [" 1 2 3", " 8 9"]), ctx)], ctx)[0]
    env = batch["completion_attention_mask"].bool() & ~batch["completion_mask"].bool()
    assert env.any()
    batch["advantages"] = torch.tensor([0.5, -0.5, 1.0, -1.0])  # whatever the rewards were
    g = torch.Generator().manual_seed(0)
    batch["old_logps"] = -torch.rand(batch["completion_ids"].shape, generator=g)
    ref = {"logps": -torch.rand(batch["completion_ids"].shape, generator=g)}
    perturbed = {**batch, "old_logps": batch["old_logps"].masked_fill(env, -7.0)}
    perturbed_ref = {"logps": ref["logps"].masked_fill(env, -9.0)}
    trained = {**batch, "completion_mask": batch["completion_attention_mask"]}

    def grads(b, r):
        method = build_registry(plugin_manager(alignkit_grpo)).get("grpo")
        cfg = method.config(beta=0.1, loss_type="grpo", temperature=1.0, max_completion_length=60)
        model = tiny_model(seed=3)
        loss = GRPOLoss(cfg)
        loss.prepare_model(model)
        if not fused:
            loss.head = None
        out = loss(model, b, ref=r)
        sum(out.terms.values()).backward()
        return float(out.metrics["kl"][0]), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}

    (kl_a, a), (kl_b, b), (_, c) = grads(batch, ref), grads(perturbed, perturbed_ref), grads(trained, ref)
    assert kl_a == kl_b
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.allclose(a[n], c[n]) for n in a)


SMALL = ["method.num_generations=2", "method.max_completion_length=48", "method.max_turn_length=6",
         "method.max_turns=3", "method.sft_warmup_steps=0", "method.environment=guess",
         "method.environment_options={secret: 7}", "train.per_device_train_batch_size=2", "data.max_train_samples=16",
         "data.max_eval_samples=2", "train.per_device_eval_batch_size=2", "train.eval_steps=null",
         "train.logging_steps=1", "train.disable_tqdm=true", "train.plots=false"]


def guess_cli(site):
    """A runner of `alignkit run -m grpo` in a subprocess that imports this tree (not the installed one) and the
    guess plugin through its entry point."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    info = site / "alignkit_guess-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: alignkit-guess\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[alignkit]\nguess = guess_environment\n")
    path = [str(site), str(ROOT / "tests" / "core"), str(ROOT), *map(str, sorted((ROOT / "plugins").glob("*/")))]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ":".join(path),
           "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-grpo,alignkit-guess", "PATH": os.environ.get("PATH", ""),
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))}

    def cli(out, *args, wait=True, launcher=()):
        proc = subprocess.Popen([*(launcher or [sys.executable]), "-m", "alignkit", "-q", "run", "-m", "grpo",
                                 f"train.output_dir={out}", *SMALL, *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if wait:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
        return proc

    return cli


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_bit_identical_weights(tmp_path):
    """Episodes of several turns (the guess environment answers every wrong guess) resume exactly after a SIGKILL."""
    from helpers import kill_at_checkpoint_then_resume, read_jsonl

    last = kill_at_checkpoint_then_resume(tmp_path, guess_cli(tmp_path / "site"),
                                          ["train.max_steps=4", "train.save_steps=2"])
    turns = [r["episodes/turns/mean"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert last["step"] == 4 and len(turns) == 4 and max(turns) > 1, turns


def test_rollout_command_shows_each_turn_and_which_tokens_are_trained(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from alignkit.cli.commands import cli
    from helpers import ROOT

    info = tmp_path / "alignkit_guess-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: alignkit-guess\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[alignkit]\nguess = guess_environment\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "core"))
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit,alignkit-grpo,alignkit-guess")
    result = CliRunner().invoke(cli, ["-q", "rollout", "-m", "grpo", "-n", "1", *SMALL[:-4]])
    assert result.exit_code == 0, (result.output, result.exception)
    text = result.stdout
    assert text.count("--- sample ") == 2 and "model turn 1 (" in text and "model turn 2 (" in text, text
    env_parts = text.split("environment (")[1:]
    assert env_parts and all("not trained):\n" in p for p in env_parts)
    hints = [p.split("\nmodel turn")[0].split("\n---")[0].split(":\n", 1)[1] for p in env_parts]
    assert all("[[" not in h and ("higher" in h or "lower" in h) for h in hints), hints
    model = text.split("model turn 1 (")[1].split("\n")[1]
    assert model.strip().startswith("[[") and model.strip().endswith("]]"), model


def test_rollout_command_refuses_a_method_without_a_rollout():
    from helpers import refused

    assert "method 'orpo' has no rollout" in refused("rollout", "-m", "orpo")


@pytest.mark.slow
def test_two_processes_run_the_same_episodes_as_one(tmp_path):
    import sys
    from pathlib import Path

    from helpers import free_port, read_jsonl

    cli = guess_cli(tmp_path / "site")
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    args = ["train.max_steps=2", "train.save_steps=null", "method.scale_rewards=batch"]
    cli(tmp_path / "two", *args, "train.per_device_train_batch_size=1", launcher=[*torchrun, "--no-python",
                                                                                   sys.executable])
    cli(tmp_path / "one", *args, "train.per_device_train_batch_size=2")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert max(r.get("episodes/turns/mean", 0) for r in one) > 1  # episodes of several turns
    for a, b in zip(one, two):
        for key in ("loss", "reward", "episodes/turns/mean", "completions/mean_length", "rewards/env/hit/mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)

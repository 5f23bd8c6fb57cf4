"""The generation handle, reward scoring and the GRPO rollout stage, outside the engine."""

import pytest
import torch
from alignkit_grpo import GRPOConfig, GRPORollout
from alignkit_grpo.rewards import BUILTIN

import alignkit
from alignkit.errors import ConfigError, PluginError
from alignkit.online.generation import Generator, mix_seed
from alignkit.online.rewards import RewardRegistry, score
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import ROOT


class Ctx:
    """A one-process step context (alignkit.StepContext's fields the rollout reads)."""

    def __init__(self, generator, training=True, step=0):
        self.generator, self.training, self.step, self.device = generator, training, step, torch.device("cpu")

    def reduce(self, tensor, op="sum"):
        return tensor.detach().clone()


class NoWrap:
    """Stands in for accelerate: nothing to unwrap."""

    @staticmethod
    def unwrap_model(model):
        return model


def generator(model=None, **kw):
    return Generator(model or tiny_model(), NoWrap(), tiny_tokenizer(), seed=0, **kw)


def test_generation_is_reproducible_and_independent_of_batching():
    gen, tok = generator(), tiny_tokenizer()
    a, b = tok("sort: 3 1 2 =")["input_ids"], tok("sort: 9 8 =")["input_ids"]
    both = gen.generate([a, b], n=3, max_new_tokens=6, seed=7)
    assert both == gen.generate([a], n=3, max_new_tokens=6, seed=7) + gen.generate([b], n=3, max_new_tokens=6, seed=7)
    assert both != gen.generate([a, b], n=3, max_new_tokens=6, seed=8)
    assert all(1 <= len(c) <= 6 for group in both for c in group) and len(both[0]) == 3
    assert len({tuple(c) for c in both[0]}) > 1  # the samples of one prompt differ
    assert gen.model.training  # eval mode while sampling only
    before = torch.get_rng_state()
    gen.generate([a], n=2, max_new_tokens=3, seed=1)
    assert torch.equal(before, torch.get_rng_state())  # the training RNG is untouched


def test_generation_uses_the_lora_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tok = tiny_tokenizer()
    ids = tok("sort: 3 1 2 =")["input_ids"]
    with_adapter = generator(model).generate([ids], n=4, max_new_tokens=6, seed=3)
    merged = model.merge_and_unload()
    assert generator(merged).generate([ids], n=4, max_new_tokens=6, seed=3) == with_adapter


def test_a_backend_with_its_own_copy_gets_the_merged_weights_under_the_base_names():
    """What the vLLM backend loads after each step: with the adapters merged, every weight of the plain model
    under its own name, equal to merge_and_unload's (no LoRA matrices, no base_layer names)."""
    import copy

    from alignkit.online.generation import base_named_weights

    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    model.merge_adapter()
    got = {name: w.clone() for name, w in base_named_weights(model)}
    model.unmerge_adapter()
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(got[name], weight.data), name
    plain = tiny_model()
    assert {n for n, _ in base_named_weights(plain)} == {n for n, _ in plain.named_parameters()}


class FakeBackend:
    def __init__(self):
        self.calls, self.synced = [], []

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        self.calls.append((prompt_ids, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed))
        return [[[7, 2]] * n for _ in prompt_ids]

    def sync_weights(self, model):
        self.synced.append(model)


def test_another_backend_gets_every_sampling_argument_and_the_weights_after_each_step():
    backend = FakeBackend()
    model = tiny_model()
    gen = Generator(model, NoWrap(), tiny_tokenizer(), seed=5, backend=backend)
    assert gen.generate([[1, 5]], n=2, max_new_tokens=4, temperature=0.5, top_p=0.9, top_k=3, seed=11) == [[[7, 2]] * 2]
    assert backend.calls == [([[1, 5]], 2, 4, 0.5, 0.9, 3, [tiny_tokenizer().eos_token_id], mix_seed(5, 11))]
    gen.sync_weights()
    assert backend.synced == [model]


def registry(**extra) -> RewardRegistry:
    r = RewardRegistry()
    for name, fn in {**BUILTIN, **extra}.items():
        r.add(name, fn, "test")
    return r


def test_score_checks_what_reward_functions_return():
    def nan_on_second(prompts, completions, **kw):
        return [1.0, float("nan")]

    funcs = registry(bad=nan_on_second).select(["exact-match", "bad"])
    with pytest.raises(PluginError, match=r"reward 'bad' returned nan for row 1 \(prompt 'q2', completion ' 2'\)"):
        score(funcs, ["q1", "q2"], [" 1", " 2"], {"answer": [" 1", " 3"]})
    out = score(funcs[:1], ["q1", "q2"], [" 1", " 2"], {"answer": [" 1", " 3"]})
    assert out.tolist() == [[1.0], [0.0]]
    assert torch.isnan(score(funcs[:1], ["q"], ["x"], {"answer": [None]})).all()  # no answer in the row: not applicable
    with pytest.raises(PluginError, match="reward 'exact-match' reads column 'answer', which the data lacks"):
        score(funcs[:1], ["q"], ["x"], {})  # no answer column at all: the reward could never score (issue 20)
    with pytest.raises(PluginError, match="returned 1 rewards for 2 completions"):
        score(registry(short=lambda prompts, completions, **kw: [0.0]).select(["short"]), ["a", "b"], ["c", "d"], {})
    with pytest.raises(ConfigError, match=r"method.reward_funcs: no reward function 'exact-mach' \(did you mean "
                                          r"'exact-match'\?\); registered: digits-format, exact-match, sort-order"):
        registry().select(["exact-mach"])
    with pytest.raises(PluginError, match="registered twice"):
        registry().add("exact-match", BUILTIN["exact-match"], "other")


def test_a_sequence_classification_checkpoint_is_a_reward(tmp_path):
    from transformers import LlamaForSequenceClassification

    from alignkit.engine.modeling import tiny_llama_config

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(tiny_llama_config(len(tok), num_labels=1)).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    [(name, fn)] = registry().select([f"model:{tmp_path / 'rm'}"])
    got = fn(["sort: 2 1 =", "sort: 3 1 2 ="], [" 1 2", " 1"])
    with torch.no_grad():
        want = [rm(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                for t in ["sort: 2 1 = 1 2", "sort: 3 1 2 = 1"]]
    assert got == pytest.approx(want, rel=1e-5)
    # a conversational prompt: the completion is the assistant's turn, rendered with the reward model's template
    chat = [{"role": "user", "content": "sort: 2 1"}]
    text = tok.apply_chat_template(chat + [{"role": "assistant", "content": "1 2"}], tokenize=False)
    with torch.no_grad():
        want = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert fn([chat], ["1 2"]) == pytest.approx([want], rel=1e-5)
    with pytest.raises(ConfigError, match="model:/nonexistent is not a loadable sequence-classification checkpoint"):
        registry().select(["model:/nonexistent"])


def prompt_batch(tok, rows):
    ids = [tok(r["prompt"])["input_ids"] for r in rows]
    width = max(map(len, ids))
    return {"prompt_input_ids": torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids]),
            "prompt_attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
            "prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]}


@pytest.mark.parametrize("iterations", [1, 2])
def test_rollout_samples_groups_scores_them_and_normalises_within_each_group(iterations):
    tok, model = tiny_tokenizer(), tiny_model()
    cfg = GRPOConfig(num_generations=4, max_completion_length=5, reward_funcs=["sort-order", "digits-format"],
                     reward_weights=[1.0, 0.5], num_iterations=iterations, mask_truncated_completions=True)
    rollout = GRPORollout(cfg, tok, rewards=registry())
    assert rollout.iterations == iterations
    rows = [{"prompt": "sort: 3 1 2 =", "answer": " 1 2 3"}, {"prompt": "sort: 5 4 =", "answer": " 4 5"}]
    ctx = Ctx(generator(model), step=3)
    out = rollout.finish([rollout(prompt_batch(tok, rows), ctx=ctx)], ctx=ctx)[0]
    N = 8
    assert out["prompt_ids"].shape[0] == out["completion_ids"].shape[0] == N
    prompt_ids = tok(rows[0]["prompt"])["input_ids"]
    assert out["prompt_ids"][0].tolist()[-len(prompt_ids):] == prompt_ids
    texts = tok.batch_decode(out["completion_ids"], skip_special_tokens=True)
    for i, text in enumerate(texts):
        answer = rows[i // 4]["answer"]
        expected = BUILTIN["sort-order"]([""], [text],
                                         answer=[answer])[0] + 0.5 * BUILTIN["digits-format"]([""], [text])[0]
        assert out["rewards"][i].item() == pytest.approx(expected)
        assert out["is_truncated"][i].item() == (tok.eos_token_id not in out["completion_ids"][i].tolist())
        if out["is_truncated"][i]:
            assert out["completion_mask"][i].sum() == 0
    for g in range(2):
        r = out["rewards"][4 * g:4 * g + 4].double()
        std = r.std()
        expected = (r - r.mean()) / (std + 1e-4) if std > 0 else torch.zeros(4, dtype=torch.float64)
        assert out["advantages"][4 * g:4 * g + 4].double() == pytest.approx(expected.tolist(), abs=1e-5)
    assert ("old_logps" in out) == (iterations > 1)
    again = rollout(prompt_batch(tok, rows), ctx=ctx)
    assert torch.equal(again["completion_ids"], out["completion_ids"])  # the same step samples the same


def test_the_docs_third_party_reward_plugin_is_found_by_name_and_used(tmp_path, monkeypatch):
    import re
    import sys

    from alignkit.plugins import get_plugin_manager
    from test_registry import install_fake_dist

    doc = (ROOT / "docs" / "hooks.md").read_text()
    source = re.search(r"```python\n# my_rewards.py\n(.*?)```", doc, re.S).group(1)
    install_fake_dist(tmp_path, "my-rewards", "char-penalty", "my_rewards", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "my-rewards,alignkit-grpo")
    sys.modules.pop("my_rewards", None)
    found = RewardRegistry.from_plugins(get_plugin_manager())
    assert found.functions["char-penalty"][1] == "my-rewards" and "exact-match" in found.functions
    funcs = found.select(["char-penalty", "exact-match"])
    out = score(funcs, ["p", "p", "p"], [" 1 2", "x" * 30, " 3"], {"max_chars": [10, 10, None], "answer": [" 1 2"] * 3})
    assert out[:, 0].tolist()[:2] == pytest.approx([0.0, -0.2]) and torch.isnan(out[2, 0])
    assert out[:, 1].tolist() == [1.0, 0.0, 0.0]


def test_demo_warmup_trains_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    from alignkit_grpo import GRPOFormatter
    from alignkit_grpo import formatter as grpo_formatter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = alignkit.get_method("grpo").config(sft_warmup_steps=3)
    first, second, untouched = tiny_model(), tiny_model(), tiny_model()
    GRPOFormatter(cfg, tiny_tokenizer()).prepare_model(first)
    assert len(list((tmp_path / "alignkit" / "grpo-warmup").glob("*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr(grpo_formatter, "sft_warmup", lambda *a, **k: calls.append(a))
    GRPOFormatter(cfg, tiny_tokenizer()).prepare_model(second)
    assert calls == []  # loaded, not trained again
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), untouched.state_dict().values()))


def test_finish_normalises_by_the_std_of_the_whole_step():
    cfg = GRPOConfig(num_generations=2, scale_rewards="batch", reward_funcs=["exact-match"])
    rollout = GRPORollout(cfg, tiny_tokenizer(), rewards=registry())
    batches = [{"rewards": torch.tensor([1.0, 0.0])}, {"rewards": torch.tensor([1.0, 1.0])}]
    ctx = Ctx(generator=None)
    rollout.finish(batches, ctx=ctx)
    std = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64).std().item()  # over both micro-batches
    assert batches[0]["reward_std"].tolist() == pytest.approx([std, std])
    assert batches[0]["advantages"].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)], rel=1e-6)
    assert batches[1]["advantages"].tolist() == [0.0, 0.0]

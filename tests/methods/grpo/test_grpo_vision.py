"""Issue 25, items 3 and 4 (GRPO): prompt-only rows with images. The processor renders the prompt, the pixel values
travel with it through generation (repeated for each of its completions) and reach the policy's, the old policy's
and the reference's log-prob forwards; bad input is one line, exit 2, before anything is written."""

import functools

import alignkit_grpo
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Idefics3ForConditionalGeneration

import alignkit
from alignkit.config import ModelConfig
from alignkit.engine.data import load_data
from alignkit.online.generation import Generator
from alignkit.testing import plugin_manager
from helpers import fast, refused, write_jsonl

VLM = "builtin:tiny-vlm"


class NoWrap:
    def unwrap_model(self, model):
        return model


class Ctx:
    """A one-process step context (the fields the rollout reads)."""

    def __init__(self, generator, training=True, step=0):
        self.generator, self.training, self.step, self.device = generator, training, step, torch.device("cpu")

    def reduce(self, tensor, op="sum"):
        return tensor.detach().clone()


def grpo(**method):
    cfg, m = alignkit.load_config("grpo", {"model": {"name_or_path": VLM}, "method": method},
                                  plugins=plugin_manager(alignkit_grpo))
    tokenizer = alignkit.load_tokenizer(cfg.model)
    return cfg, m, tokenizer


def row(colour, text="Which colour?", answer="red"):
    return {"images": [Image.new("RGB", (24, 24), colour)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            "answer": answer}


def direct_logps(model, out, temperature):
    """log p(completion token) [N, C] from one plain forward of the model with the batch's pixel values."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=out["pixel_values"],
                   pixel_attention_mask=out["pixel_attention_mask"], use_cache=False).logits
    p = out["prompt_ids"].shape[1]
    logps = torch.log_softmax(logits[:, p - 1:-1].float() / temperature, -1)
    picked = logps.gather(-1, out["completion_ids"][..., None]).squeeze(-1)
    return picked * out["completion_mask"]


def test_a_prompt_row_with_an_image_is_rendered_by_the_processor():
    cfg, method, tokenizer = grpo()
    formatter = method.formatter(cfg.method, tokenizer)
    example = row((255, 0, 0))
    features = formatter.format(example).features
    rendered = "<|user|>\n<image>Which colour?<|end|>\n<|assistant|>\n"
    want = tokenizer.processor(images=[example["images"]], text=[rendered], add_special_tokens=False,
                               return_tensors="pt")
    assert features["prompt_input_ids"] == want["input_ids"][0].tolist()
    torch.testing.assert_close(torch.tensor(features["pixel_values"]), want["pixel_values"][0])
    assert features["answer"] == "red"  # the other columns stay for the rewards
    # standard text with the processor's image token: the same expansion (the built-in tokenizer adds no BOS to text)
    text = formatter.format({**example, "prompt": "<image>Which colour?"}).features["prompt_input_ids"]
    plain = tokenizer.processor(images=[example["images"]], text=["<image>Which colour?"], add_special_tokens=False)
    assert tokenizer("x")["input_ids"] == tokenizer("x", add_special_tokens=False)["input_ids"]
    assert text == plain["input_ids"][0] and text.count(tokenizer.processor.image_token_id) == 4


def test_pixel_values_travel_through_generation_and_every_log_prob_forward():
    """Each prompt's image reaches generate (repeated for its completions); the completions' log-probs in the
    loss, the reference's and the old policy's (num_iterations=2) equal a direct forward with the images (not with
    the other prompt's)."""
    cfg, method, tokenizer = grpo(num_generations=3, max_completion_length=4, num_iterations=2, temperature=0.7)
    model = alignkit.load_model(cfg.model, tokenizer, seed=0)
    formatter = method.formatter(cfg.method, tokenizer)
    batch = formatter.collate([formatter.format(row(c)).features for c in ((255, 0, 0), (0, 0, 255))])
    rollout = method.rollout(cfg.method, tokenizer, rewards=alignkit.online.rewards.RewardRegistry.from_plugins(
        plugin_manager(alignkit_grpo)))
    seen = []
    original = Idefics3ForConditionalGeneration.forward

    @functools.wraps(original)  # generate reads the forward's signature
    def spy(self, input_ids=None, pixel_values=None, **kw):
        seen.append((input_ids, pixel_values if pixel_values is not None else kw.get("mm_encoder_outputs")))
        return original(self, input_ids=input_ids, pixel_values=pixel_values, **kw)

    generator = Generator(model, NoWrap(), tokenizer, seed=0)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(Idefics3ForConditionalGeneration, "forward", spy)
        out = rollout(batch, Ctx(generator))
    image_id = tokenizer.processor.image_token_id
    # generate's prefill gets the images as generate encoded them (mm_encoder_outputs); the scoring forward the pixels
    with_images = [(ids, px) for ids, px in seen if (ids == image_id).any()]
    assert len(with_images) == 2 and all(px is not None for _, px in with_images)
    assert with_images[1][1].shape[0] == with_images[1][0].shape[0] == 6
    assert out["pixel_values"].shape[0] == 6  # 2 prompts x 3 completions, each prompt's image repeated
    torch.testing.assert_close(out["pixel_values"][0], out["pixel_values"][2])
    assert not torch.equal(out["pixel_values"][0], out["pixel_values"][3])
    with torch.no_grad():
        want = direct_logps(model, out, 0.7)
        swapped = direct_logps(model, {**out, "pixel_values": out["pixel_values"].flip(0)}, 0.7)  # the other picture
        loss = method.loss(cfg.method)
        got, _ = loss._logps(model, out)
        ref = loss.reference(model, out)["logps"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["old_logps"], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(swapped, want, atol=1e-4)  # the images matter to these log-probs


def test_grpo_trains_a_vision_language_model_on_prompts_with_images(tmp_path):
    config = fast(tmp_path, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=2, logging_steps=1)
    config["data"] = {"train": "builtin:shapes-prompts", "max_train_samples": 8, "max_eval_samples": 4}
    config["model"] = {"name_or_path": VLM, "freeze_vision_tower": False}
    config["method"] = {"num_generations": 2, "max_completion_length": 3, "beta": 0.1}
    calls = []
    original = Idefics3ForConditionalGeneration.forward

    @functools.wraps(original)
    def spy(self, input_ids=None, pixel_values=None, **kw):
        images = pixel_values is not None or kw.get("mm_encoder_outputs") is not None  # generate encodes them first
        calls.append((torch.is_grad_enabled(), images, bool((input_ids == 385).any())))
        return original(self, input_ids=input_ids, pixel_values=pixel_values, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Idefics3ForConditionalGeneration, "forward", spy)
        result = alignkit.run("grpo", config, plugins=plugin_manager(alignkit_grpo))
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert all(px for _, px, image in calls if image)  # every forward that reads image tokens got the pixels
    assert any(grad and px for grad, px, _ in calls)  # the loss's forward, with gradient, read them
    tokenizer = alignkit.load_tokenizer(ModelConfig(name_or_path=VLM))
    start = alignkit.load_model(ModelConfig(name_or_path=VLM), tokenizer, seed=result.config.train.seed).state_dict()
    trained = load_file(result.output_dir / "model.safetensors")
    changed = [k for k in trained if k in start and not torch.equal(trained[k], start[k])]
    assert any("text_model" in k for k in changed), sorted(trained)[:5]


def test_shapes_prompts_hold_an_image_a_question_and_its_answer():
    ds = load_data("builtin:shapes-prompts", "test")
    r = ds[0]
    assert len(r["images"]) == 1 and r["prompt"][0]["content"][0]["type"] == "image"
    assert r["answer"] in ("red", "green", "blue", "yellow", "circle", "square", "triangle", "1", "2", "3")


def prompt_file(tmp_path):
    from PIL import Image

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "pics" / "red.png")
    rows = [{"images": ["pics/red.png"], "prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Which colour?"}]}], "answer": "red"}] * 4
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_images_with_a_text_only_policy_are_refused_naming_the_row(tmp_path):
    out = tmp_path / "out"
    line = refused("run", "--method", "grpo", f"data.train={prompt_file(tmp_path)}", "model.name_or_path=builtin:tiny",
                   f"train.output_dir={out}", "train.max_steps=1", written=out)
    assert "row 0" in line and "text-only" in line and "builtin:tiny-vlm" in line


def test_images_with_the_vllm_backend_are_refused(tmp_path):
    out = tmp_path / "out"
    data = prompt_file(tmp_path)
    for key in ("method.generation_backend=vllm", "generation.backend=vllm"):
        line = refused("run", "--method", "grpo", f"data.train={data}", f"model.name_or_path={VLM}", key,
                       f"train.output_dir={out}", "train.max_steps=1", written=out)
        assert key.split("=")[0] in line and "images" in line and "transformers" in line


class Fixed:
    """A generator that answers every prompt with the given token ids and records the stop tokens it was given."""

    def __init__(self, completion):
        self.completion, self.stops = completion, []

    def generate(self, prompts, n, stop_token_ids, **kw):
        self.stops.append(stop_token_ids)
        return [[list(self.completion)] * n for _ in prompts]

    def vision(self):
        return Generator(None, NoWrap(), self.tokenizer, seed=0).vision()


def test_a_conversational_prompt_s_completion_ends_at_the_chat_template_s_end_of_turn():
    """The built-in template closes a turn with <|end|>, not EOS: sampling stops there, the completion is not
    truncated, and the reward reads the answer without it (exact-match)."""
    cfg, method, tokenizer = grpo(num_generations=2, max_completion_length=6, reward_funcs=["exact-match"])
    formatter = method.formatter(cfg.method, tokenizer)
    batch = formatter.collate([formatter.format(row((255, 0, 0))).features])
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    fixed = Fixed(tokenizer("red", add_special_tokens=False)["input_ids"] + [end])
    fixed.tokenizer = tokenizer
    rollout = method.rollout(cfg.method, tokenizer, rewards=alignkit.online.rewards.RewardRegistry.from_plugins(
        plugin_manager(alignkit_grpo)))
    out = rollout(batch, Ctx(fixed))
    assert fixed.stops == [[tokenizer.eos_token_id, end]]
    assert out["rewards"].tolist() == [1.0, 1.0] and not out["is_truncated"].any()
    # a standard-text prompt keeps EOS alone as its stop
    text = formatter.collate([formatter.format({**row((255, 0, 0)), "prompt": "<image>Which colour?"}).features])
    rollout(text, Ctx(fixed))
    assert fixed.stops[-1] == [tokenizer.eos_token_id]


def test_prompts_with_images_never_sample_the_image_token():
    """A sampled image token would need an image the row does not have (the scoring forward fails): generation with
    images suppresses it, even when the model favours it."""
    cfg, method, tokenizer = grpo()
    model = alignkit.load_model(cfg.model, tokenizer, seed=0)
    image_id = tokenizer.processor.image_token_id

    def favour(module, inputs, logits):  # the image token is now the likeliest next token
        logits[..., image_id] += 100.0
        return logits

    model.get_output_embeddings().register_forward_hook(favour)
    formatter = method.formatter(cfg.method, tokenizer)
    features = formatter.format(row((255, 0, 0))).features
    generator = Generator(model, NoWrap(), tokenizer, seed=0)
    text_only = generator.generate([tokenizer("Which colour?")["input_ids"]], n=4, max_new_tokens=4)
    assert any(image_id in c for c in text_only[0])  # the boost works: without images nothing stops it
    images = {k: features[k] for k in ("pixel_values", "pixel_attention_mask")}
    sampled = generator.generate([features["prompt_input_ids"]], n=4, max_new_tokens=4, images=[images])
    assert all(c and image_id not in c for c in sampled[0])


def test_the_grpo_vlm_demo_configs_load_and_run_two_steps(tmp_path):
    """configs/grpo-vlm-warmup.yaml, then configs/grpo-vlm-demo.yaml from its output (2 steps each, a few rows)."""
    from helpers import ROOT

    quick = {"train.max_steps": 2, "train.disable_tqdm": True, "train.plots": False, "train.save_steps": None,
             "train.eval_steps": None, "train.eval_on_start": False, "data.max_train_samples": 8,
             "data.max_eval_samples": 4, "train.per_device_train_batch_size": 2, "train.per_device_eval_batch_size": 4}
    warm = alignkit.run(None, str(ROOT / "configs" / "grpo-vlm-warmup.yaml"),
                        **{**quick, "train.output_dir": str(tmp_path / "warm")})
    assert warm.config.method.name == "sft" and warm.global_step == 2
    result = alignkit.run(None, str(ROOT / "configs" / "grpo-vlm-demo.yaml"),
                          **{**quick, "model.name_or_path": str(warm.output_dir), "method.num_generations": 2,
                             "train.output_dir": str(tmp_path / "g"), "method.max_completion_length": 3})
    assert result.config.method.name == "grpo" and result.config.method.reward_funcs == ["exact-match"]
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert result.config.data.train == "builtin:shapes-prompts"


@pytest.mark.slow  # the warm-up, then 150 GRPO steps: minutes on 2 CPU cores (benchmarks/grpo-vlm-demo.md)
def test_the_grpo_vlm_demo_raises_the_held_out_reward(tmp_path):
    from helpers import ROOT, read_jsonl

    quiet = {"train.disable_tqdm": True, "train.plots": False, "train.save_steps": None}
    warm = alignkit.run(None, str(ROOT / "configs" / "grpo-vlm-warmup.yaml"),
                        **{**quiet, "train.output_dir": str(tmp_path / "warm")})
    result = alignkit.run(None, str(ROOT / "configs" / "grpo-vlm-demo.yaml"),
                          **{**quiet, "model.name_or_path": str(warm.output_dir),
                             "train.output_dir": str(tmp_path / "g")})
    evals = [r["eval_reward"] for r in read_jsonl(result.output_dir / "metrics.jsonl") if "eval_reward" in r]
    assert len(evals) == 7 and evals[-1] - evals[0] >= 0.2, evals

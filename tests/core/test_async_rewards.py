"""Async reward functions (issue 24, item 3): a reward registered as a coroutine function is awaited, every async
reward of a scoring call runs concurrently on one event loop made for that call (none left behind), also when the
call comes from a worker thread (async rollouts) or from code already inside an event loop (a notebook)."""

import asyncio
import functools
import threading
import time

import pytest
import torch

import alignkit
from alignkit.errors import AlignkitError, PluginError
from alignkit.online.rewards import call_reward, score
from alignkit.testing import plugin_manager

PROMPTS = ["2+2=", "3+3=", "1+1=", "5+1="]
COMPLETIONS = ["4", "7", "2", "six"]
COLUMNS = {"answer": ["4", "6", "2", "6"]}


def matches(prompts, completions, answer, **kw):
    return [float(c == a) if c.isdigit() else None for c, a in zip(completions, answer)]


async def matches_async(prompts, completions, answer, **kw):
    await asyncio.sleep(0)
    return [float(c == a) if c.isdigit() else None for c, a in zip(completions, answer)]


class Scorer:
    """A callable object whose __call__ is a coroutine function."""

    async def __call__(self, prompts, completions, **kw):
        await asyncio.sleep(0)
        return [len(c) for c in completions]


def test_an_async_reward_scores_what_the_same_function_called_synchronously_scores():
    sync = score([("m", matches), ("len", lambda prompts, completions, **kw: [len(c) for c in completions])],
                 PROMPTS, COMPLETIONS, COLUMNS)
    both = score([("m", matches_async), ("len", Scorer())], PROMPTS, COMPLETIONS, COLUMNS)
    assert torch.equal(sync.isnan(), both.isnan()) and bool(sync.isnan()[3, 0])
    assert torch.equal(sync.nan_to_num(-1), both.nan_to_num(-1))
    assert call_reward("m", matches_async, PROMPTS, COMPLETIONS, COLUMNS) == [1.0, 0.0, 1.0, None]
    partial = functools.partial(matches_async, answer=["4", "4", "4", "4"])
    assert call_reward("p", partial, PROMPTS, COMPLETIONS, {}) == [1.0, 0.0, 0.0, None]


def _sleeper(seconds):
    async def sleepy(prompts, completions, **kw):
        await asyncio.sleep(seconds)
        return [1.0] * len(completions)
    return sleepy


def test_the_async_rewards_of_one_scoring_call_run_concurrently():
    n = 6
    functions = [(f"sleep{i}", _sleeper(0.2)) for i in range(n)]
    start = time.perf_counter()
    out = score(functions, PROMPTS, COMPLETIONS, COLUMNS)
    took = time.perf_counter() - start
    assert out.shape == (4, n) and bool((out == 1.0).all())
    assert took < n * 0.2 / 2, took  # one after another they would take 1.2 s


def test_no_event_loop_or_thread_is_left_behind():
    threads = threading.active_count()
    for _ in range(3):
        score([("m", matches_async)], PROMPTS, COMPLETIONS, COLUMNS)
    assert threading.active_count() == threads
    assert asyncio._get_running_loop() is None
    with pytest.raises(RuntimeError):  # the calls set no event loop on this thread
        asyncio.get_running_loop()


def test_scoring_from_a_worker_thread_and_from_inside_a_running_event_loop():
    expected = [1.0, 0.0, 1.0, float("nan")]
    results = []
    worker = threading.Thread(target=lambda: results.append(score([("m", matches_async)], PROMPTS, COMPLETIONS,
                                                                    COLUMNS)))
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and len(results) == 1
    assert results[0][:, 0].nan_to_num(-1).tolist() == torch.tensor(expected).nan_to_num(-1).tolist()

    async def inside_a_loop():  # e.g. a notebook cell: the scoring call must not try to reuse the running loop
        return score([("m", matches_async)], PROMPTS, COMPLETIONS, COLUMNS)

    out = asyncio.run(inside_a_loop())
    assert out[:, 0].nan_to_num(-1).tolist() == torch.tensor(expected).nan_to_num(-1).tolist()


def test_an_async_rewards_mistakes_are_reported_as_a_sync_ones_are():
    async def short(prompts, completions, **kw):
        return [1.0]

    async def reads_gold(prompts, completions, **kw):
        return [float(g == c) for g, c in zip(kw["gold"], completions)]

    with pytest.raises(PluginError, match=r"reward 'short' returned 1 rewards for 4 completions"):
        score([("ok", matches_async), ("short", short)], PROMPTS, COMPLETIONS, COLUMNS)
    with pytest.raises(PluginError, match=r"reward 'gold' reads column 'gold', which the data lacks"):
        call_reward("gold", reads_gold, PROMPTS, COMPLETIONS, COLUMNS)


class AsyncRewards:
    @alignkit.hookimpl
    def register_rewards(self, register):
        async def sort_order_async(prompts, completions, **kw):
            await asyncio.sleep(0.01)
            return [float(c.strip().startswith("1")) for c in completions]

        register("starts-with-one", sort_order_async)


@pytest.mark.parametrize("staleness", [0, 1])  # 1: the rollout (and its scoring) runs in a worker thread
def test_a_grpo_run_trains_with_an_async_reward(tmp_path, staleness):
    import alignkit_grpo

    from helpers import read_jsonl

    pm = plugin_manager(alignkit_grpo, AsyncRewards())
    out = tmp_path / "out"
    try:
        alignkit.run("grpo", plugins=pm, **{
            "method.num_generations": 2, "method.max_completion_length": 4, "method.sft_warmup_steps": 0,
            "method.reward_funcs": ["starts-with-one"], "method.max_staleness": staleness,
            "data.max_train_samples": 8, "train.max_steps": 2, "train.per_device_train_batch_size": 2,
            "train.save_steps": None, "train.plots": False, "train.disable_tqdm": True, "train.logging_steps": 1,
            "train.output_dir": str(out)})
    except AlignkitError as e:
        pytest.fail(str(e))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["rewards/starts-with-one/mean"] <= 1.0 for r in rows), rows

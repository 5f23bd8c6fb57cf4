"""A third-party environment plugin for the tests (registered through an entry point in a dist-info the tests lay
out): `guess`, an async environment that says "higher"/"lower" until the model's turn names the row's number, with a
reward part per turn, and `bad-tool`, a tool environment whose tool cannot become a schema."""

import asyncio

from pydantic import BaseModel, ConfigDict

import alignkit
from alignkit.online.environments import ToolEnvironment


class GuessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret: int = 5


class GuessEnvironment:
    """Guess the secret digit: "higher" or "lower" after each wrong guess."""

    options_class = GuessOptions
    reward_names = ("hit",)
    resets: list = []  # every row reset, for the tests

    def __init__(self, options: GuessOptions) -> None:
        self.secret = options.secret

    async def reset(self, row):
        await asyncio.sleep(0)
        GuessEnvironment.resets.append(row["prompt"])
        return [{"role": "user", "content": f"guess a digit ({row['prompt']})"}]

    async def step(self, message):
        await asyncio.sleep(0)
        digits = [int(c) for c in message["content"] if c.isdigit()]
        if digits and digits[0] == self.secret:
            return None, {"hit": 1.0}, True
        hint = "higher" if not digits or digits[0] < self.secret else "lower"
        return [{"role": "user", "content": hint}], {"hit": 0.0}, False


def untyped(x):
    return x


class BadTools(ToolEnvironment):
    """Offers a tool with no type hints or docstring."""

    tools = (untyped,)


@alignkit.hookimpl
def register_environments(register):
    register("guess", GuessEnvironment)
    register("bad-tool", BadTools)

"""The reward method's `method:` block: TRL 1.16 RewardConfig's training and data fields, with its defaults."""

from pydantic import Field

from alignkit import MethodConfig


class RewardConfig(MethodConfig):
    name: str = "reward"
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of mean((r_chosen + r_rejected)^2) added to the loss, pulling rewards towards "
        "mean zero (arXiv 2312.09244, eq. 2; 0.01 recommended); null: no such term.")
    max_length: int | None = Field(
        1024, gt=0, description="Pairs whose chosen or rejected sequence has more tokens are dropped (never "
        "truncated: a cut sequence would be scored at another token); null: no limit.")
    disable_dropout: bool = Field(True, description="Set p=0 on every Dropout module of the model.")
    share_prompt: bool | None = Field(
        None, description="Run each pair as one row, [prompt, chosen, rejected], their common prefix computed once "
        "(same rewards; a transformers sequence classifier with sdpa or eager attention and a pad token). null: on "
        "where the model supports it.")
    dataset_num_proc: int | None = Field(None, gt=0, description="Processes for dataset preprocessing.")

"""What a reward model may start from (plugins/alignkit-reward/README.md): a causal LM or base model gets a fresh
one-label score head (as TRL's RewardTrainer loads any checkpoint with AutoModelForSequenceClassification), a
one-label classifier goes on training its head; a classifier with another number of labels is refused in one line."""

import pytest
import torch
from reward_support import train
from transformers import AutoModelForSequenceClassification

from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import refused


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    tiny_model(seed=3).save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")
    for labels in (1, 2):
        model = AutoModelForSequenceClassification.from_pretrained(root / "lm", num_labels=labels)
        model.config.pad_token_id = 0
        model.save_pretrained(root / f"cls{labels}")
        tiny_tokenizer().save_pretrained(root / f"cls{labels}")
    return root


def test_a_causal_lm_gets_a_fresh_head_drawn_from_the_seed(tmp_path, folders):
    heads = []
    for run in ("a", "b"):
        _, result = train(tmp_path / run, steps=1, model={"name_or_path": str(folders / "lm")})
        model = AutoModelForSequenceClassification.from_pretrained(result.output_dir)
        assert model.config.num_labels == 1 and type(model).__name__ == "LlamaForSequenceClassification"
        heads.append(model.score.weight.detach())
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)  # the same run twice: the same model


def test_a_one_label_classifier_trains_on(tmp_path, folders):
    _, result = train(tmp_path, steps=1, model={"name_or_path": str(folders / "cls1")})
    assert result.global_step == 1


def test_a_classifier_with_other_labels_is_refused(tmp_path, folders):
    out = tmp_path / "out"
    line = refused("run", "--method", "reward", f"model.name_or_path={folders / 'cls2'}", f"train.output_dir={out}",
                   written=out)
    assert line == (f"alignkit: error: model.name_or_path: {folders / 'cls2'} is a LlamaForSequenceClassification "
                    "with 2 labels, and this method's model has 1 (start from a classifier with 1, or from a base or "
                    "causal language model, which gets a fresh head)")

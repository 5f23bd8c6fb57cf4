"""LLM judges: a causal language model asked, with a prompt template, for a score or for the better of two
completions (docs/online.md, "LLM judges").

`Judge(model, tokenizer)` reads the judge's next-token distribution after the filled-in template, restricted to the
label tokens: `score` is the expected digit (labels 0-9) divided by 9, in [0, 1]; `compare` is the probability that
the first completion is the better one (labels A, B), averaged over both orders so that the position does not count.
Greedy decoding is never used, so the answers are deterministic and bounded on any model, the tiny built-in one too.
`judge:MODEL` in method.reward_funcs is the reward `JudgeReward` (MODEL: a causal LM folder, `model:FOLDER`, a hub
name, or builtin:tiny, initialised from seed 0).
"""

from pathlib import Path

import torch

from alignkit.blocks.tokens import pad_right
from alignkit.errors import ConfigError

JUDGE_PREFIX = "judge:"
BUILTIN = "builtin:tiny"


def _text(x) -> str:
    """A prompt or completion as text: a conversation as `role: content` lines."""
    if isinstance(x, str):
        return x
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in x)


class Judge:
    """A causal LM as a judge; `score(prompts, completions)` and `compare(prompts, first, second)` -> floats in
    [0, 1]."""

    SCORE_TEMPLATE = ("Rate how well the response answers the request, from 0 (not at all) to 9 (perfectly).\n\n"
                      "Request: {prompt}\nResponse: {completion}\nRating (0-9): ")
    PAIR_TEMPLATE = ("Which response answers the request better, A or B?\n\nRequest: {prompt}\nResponse A: {first}\n"
                     "Response B: {second}\nBetter response (A or B): ")
    SCORE_LABELS = tuple("0123456789")
    PAIR_LABELS = ("A", "B")

    def __init__(self, model, tokenizer, template: str | None = None, pairwise_template: str | None = None,
                 batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.template = template or self.SCORE_TEMPLATE
        self.pairwise_template = pairwise_template or self.PAIR_TEMPLATE
        self.score_ids = [self._label_id(label) for label in self.SCORE_LABELS]
        self.pair_ids = [self._label_id(label) for label in self.PAIR_LABELS]

    @classmethod
    def load(cls, name_or_path: str, template: str | None = None, pairwise_template: str | None = None) -> "Judge":
        """The judge in a causal LM folder (or a hub name, or builtin:tiny from seed 0); the caller's random state is
        left as it was."""
        from alignkit import load_model, load_tokenizer  # the host's loaders (a lazy import: online/ sits below it)
        from alignkit.config import ModelConfig

        cfg = ModelConfig(name_or_path=name_or_path)
        with torch.random.fork_rng():
            tokenizer = load_tokenizer(cfg)
            model = load_model(cfg, tokenizer, seed=0)
        if torch.cuda.is_available():
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        return cls(model, tokenizer, template, pairwise_template)

    def _label_id(self, label: str) -> int:
        tok = self.tokenizer
        token = tok.convert_tokens_to_ids(label)
        if token is None or token == tok.unk_token_id:
            ids = tok(label, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"the judge's tokenizer ({tok.name_or_path}) cannot write the label {label!r}")
            token = ids[-1]
        return token

    def _probs(self, texts: list[str], label_ids: list[int]) -> torch.Tensor:
        """[texts, labels]: the next-token distribution after each text, restricted to the labels (float64)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        rows = [self.tokenizer(t)["input_ids"] for t in texts]
        rows = [r[-limit:] if limit else r for r in rows]  # a long text keeps its end, where the question is
        device, out = next(self.model.parameters()).device, []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                ids = pad_right(batch, self.tokenizer.pad_token_id or 0).to(device)
                mask = pad_right([[1] * len(r) for r in batch], 0).to(device)
                last = torch.tensor([len(r) - 1 for r in batch], device=device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                picked = logits[torch.arange(len(batch), device=device), last][:, label_ids]
                out.append(torch.softmax(picked.double(), -1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(label_ids), dtype=torch.float64)

    def score(self, prompts: list, completions: list) -> list[float]:
        """Each completion's expected 0-9 rating / 9."""
        texts = [self.template.format(prompt=_text(p), completion=_text(c)) for p, c in zip(prompts, completions)]
        digits = torch.arange(len(self.score_ids), dtype=torch.float64)
        return ((self._probs(texts, self.score_ids) * digits).sum(-1) / (len(digits) - 1)).tolist()

    def compare(self, prompts: list, first: list, second: list) -> list[float]:
        """The probability that `first[i]` answers `prompts[i]` better than `second[i]`, averaged over both
        orders (0.5: no preference)."""
        def texts(a, b):
            return [self.pairwise_template.format(prompt=_text(p), first=_text(x), second=_text(y))
                    for p, x, y in zip(prompts, a, b)]

        n = len(prompts)
        probs = self._probs(texts(first, second) + texts(second, first), self.pair_ids)
        return ((probs[:n, 0] + probs[n:, 1]) / 2).tolist()


def check_judge(name: str, key: str = "method.reward_funcs") -> str:
    """The model of `judge:MODEL` (an optional `model:` before a folder dropped); a ConfigError naming `key` unless
    it is builtin:tiny or a causal LM's folder (or hub name) whose config can be read."""
    path = name.removeprefix(JUDGE_PREFIX).removeprefix("model:")
    if not path:
        raise ConfigError(f"{key}: {name} names no model; write judge:FOLDER (a causal language model) or "
                          f"judge:{BUILTIN}")
    if path == BUILTIN:
        return path
    from transformers import AutoConfig

    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {name}: {path} has no config.json; a judge is a causal language model's folder")
    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        said = "no such model folder" if not folder.exists() else "cannot read its config"
        raise ConfigError(f"{key}: {name}: {said} ({first[:160]}); a judge is a causal language model's folder, a "
                          f"hub name, or {BUILTIN}") from None
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ConfigError(f"{key}: {name}: {path} is a {architectures[0]}, not a causal language model (a judge "
                          "writes its answer; for a sequence classifier use model:PATH)")
    return path


class JudgeReward:
    """The reward `judge:MODEL`: the judge's score of each completion, in [0, 1]. The model is checked when the
    reward is selected and loaded at its first call."""

    probe_before_training = False  # check_data does not run it

    def __init__(self, name: str, settings=None) -> None:
        self.path = check_judge(name)
        self.template = getattr(settings, "judge_template", None)
        self.pairwise_template = getattr(settings, "judge_pairwise_template", None)
        self.judge: Judge | None = None

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        if self.judge is None:
            self.judge = Judge.load(self.path, self.template, self.pairwise_template)
        return self.judge.score(prompts, completions)

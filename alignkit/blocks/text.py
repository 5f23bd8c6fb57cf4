"""Text building blocks: validate TRL-style columns and conversations, render them with the chat template, and
split a prompt from its completion(s).

Rows come in two formats (TRL's conventions): *standard* (strings) and *conversational* (lists of
`{"role", "content"}` messages). Every check raises a one-line `DataError` naming the column.
"""

import difflib
from typing import Any

from alignkit.blocks.tokens import with_bos
from alignkit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def is_conversation(value: Any) -> bool:
    """A non-empty list of dicts (messages)."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def is_content_parts(content: Any) -> bool:
    """Multimodal content: a list of `{"type": "text", "text": ...}` / `{"type": "image"}` parts (TRL's shape)."""
    def part(p) -> bool:
        return isinstance(p, dict) and (p.get("type") == "image" or
                                        (p.get("type") == "text" and isinstance(p.get("text"), str)))
    return isinstance(content, list) and all(part(p) for p in content)


def check_messages(column: str, messages: list[dict]) -> None:
    """Each message needs string `role` (one of ROLES) and `content` (a string, or a list of text and image parts)."""
    for i, m in enumerate(messages):
        for key in ("role", "content"):
            if key not in m or m[key] is None:
                raise DataError(f"'{column}' message {i} has no '{key}' (it has "
                                f"{', '.join(map(repr, sorted(m))) or 'no keys'})")
            if key == "content" and is_content_parts(m[key]):
                continue
            if not isinstance(m[key], str):
                raise DataError(f"'{column}' message {i}: '{key}' must be a string, got {type(m[key]).__name__} "
                                f"{str(m[key])[:40]!r}")
        if m["role"] not in ROLES:
            raise DataError(f"'{column}' message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")


def column(example: dict[str, Any], name: str, expected: str = "") -> Any:
    """`example[name]` as a non-empty string or a valid conversation; a DataError naming the column otherwise.
    `expected` completes the missing-column message (which columns the format needs)."""
    if name not in example:
        raise DataError(f"missing column '{name}'{'; ' + expected if expected else ''}{row_has(example)}")
    value = example[name]
    if value is None or not (isinstance(value, str) or is_conversation(value)):
        raise DataError(f"'{name}' must be a string or a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    if value == "":
        raise DataError(f"'{name}' is an empty string")
    if not isinstance(value, str):
        check_messages(name, value)
    return value


#: the column names of TRL's dataset types: a row's column close to one of them is named as a likely misspelling
COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "messages", "text", "answer")


def row_has(example: dict[str, Any]) -> str:
    """'; the row has A, B (A looks like ...)': the row's columns and those that look like a misspelled column name
    of TRL's dataset types the row lacks."""
    if not example:
        return "; the row has no columns"
    absent = [c for c in COLUMNS if c not in example]
    like = []
    for key in sorted(example):
        close = difflib.get_close_matches(str(key).lower(), absent, n=1, cutoff=0.75) if key not in COLUMNS else []
        if close:
            like.append(f"'{key}' {'looks ' if not like else ''}like '{close[0]}'")
    return f"; the row has {', '.join(repr(k) for k in sorted(example))}{' (' + ', '.join(like) + ')' if like else ''}"


def same_format(*named: tuple[str, Any]) -> bool:
    """True when every value is a conversation, False when every one is a string; a DataError naming the
    columns when they mix."""
    kinds = {isinstance(v, str) for _, v in named}
    if len(kinds) > 1:
        names = " and ".join(f"'{n}'" for n, _ in named)
        raise DataError(f"{names} must {'both' if len(named) == 2 else 'all'} be strings or "
                        f"{'both' if len(named) == 2 else 'all'} be conversations")
    return not kinds.pop()


def given_prompt(example: dict[str, Any], name: str, value: Any) -> Any:
    """The row's explicit `prompt`, or None when the row has no `prompt` column (an implicit prompt); a DataError when
    it is null or not in the format of the column `name` (whose value is `value`)."""
    if "prompt" not in example:
        return None
    prompt = example["prompt"]
    if prompt is None:
        raise DataError(f"'prompt' is null; give the prompt, or leave the column out (the prompt is then the common "
                        f"start of '{name}' and the other completion)")
    if isinstance(prompt, str) != isinstance(value, str):
        def kind(v):
            return "a string" if isinstance(v, str) else "a conversation" if isinstance(v, list) else type(v).__name__
        raise DataError(f"'prompt' is {kind(prompt)} but '{name}' {kind(value)}; a row's columns must all be strings "
                        "or all be conversations")
    return prompt


def common_prefix(*texts: str) -> str:
    """The longest common prefix of strings (or lists). Bisects on slice equality: fast on huge rows."""
    lo, hi = 0, min(len(t) for t in texts)
    first = texts[0]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if all(t[:mid] == first[:mid] for t in texts[1:]):
            lo = mid
        else:
            hi = mid - 1
    return first[:lo]


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """Split an implicit prompt off a pair: their longest common prefix (characters or messages).

    A space just before the split point goes to the completions; when one is a prefix of the other, the last
    common element goes to both completions (TRL's behaviour).
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise DataError("'chosen' and 'rejected' must be non-empty to extract an implicit prompt")
    idx = len(common_prefix(chosen, rejected))
    if idx == n:
        idx = n - 1
    elif idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def require_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the data is conversational but the tokenizer has no chat template; "
                        "set model.tokenizer_name_or_path to one that has")


def render(tokenizer, messages: list[dict], **template_kwargs) -> str:
    """`messages` rendered by the tokenizer's chat template, as text."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)


def render_prompt(tokenizer, prompt: list[dict], **template_kwargs) -> str:
    """A prompt conversation as text ready for its completion: with a generation prompt when the last message is
    from the user, continuing the final message when it is from the assistant."""
    if not prompt:
        raise DataError("conversational rows need at least one prompt message")
    last = prompt[-1]["role"]
    if last not in ("user", "assistant"):
        raise DataError(f"the prompt's last message must be from 'user' or 'assistant', not {last!r}")
    return render(tokenizer, prompt, add_generation_prompt=last == "user",
                  continue_final_message=last == "assistant", **template_kwargs)


def prompt_token_ids(tokenizer, prompt, bos_first: bool = False, encode=None) -> list[int]:
    """The ids of a prompt (a string or a conversation) as a model trained by a formatter saw them before its
    completion: the one prompt rendering that the formatters and `alignkit generate`/`chat` share.

    A conversation is rendered by the chat template (`render_prompt`), which writes its own special tokens; a string
    is encoded with the tokenizer's own special tokens. With `bos_first` (the preference formatters, as TRL's pairwise
    preference trainers) the text is encoded without special tokens and BOS is put first. `encode(text, special)`
    replaces the tokenizer call (e.g. an `alignkit.blocks.tokens.Encoder`'s, bounded in memory for huge texts).
    """
    text = prompt if isinstance(prompt, str) else render_prompt(tokenizer, prompt)
    special = isinstance(prompt, str) and not bos_first
    ids = encode(text, special) if encode else tokenizer(text, add_special_tokens=special)["input_ids"]
    return with_bos(list(ids), tokenizer.bos_token_id) if bos_first else list(ids)


def render_split(tokenizer, prompt: list[dict], *completions: list[dict], **template_kwargs) -> tuple[str, list[str]]:
    """(prompt text, [completion texts]) of a prompt conversation and one or more completions for it.

    Each full conversation is rendered whole; the prompt text is the longest common prefix of the prompt's own
    render and every full render, so a template that renders a prompt differently alone still splits cleanly.
    """
    prompt_text = render_prompt(tokenizer, prompt, **template_kwargs)
    fulls = [render(tokenizer, prompt + c, **template_kwargs) for c in completions]
    prompt_text = common_prefix(prompt_text, *fulls)
    return prompt_text, [f[len(prompt_text):] for f in fulls]

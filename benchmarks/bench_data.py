"""Benchmark rows: exact-length synthetic rows, and multi-turn dialogues shaped like real preference data.

The dialogues are generated offline (no dataset download): a seeded generator writes conversations of
2-5 user/assistant turns from a fixed English vocabulary, then a chosen and a rejected final assistant
turn of different lengths. Measured in tokens of the given tokenizer's chat template: the prompt (all turns
before the last answer) takes 50-70% of `seq`, each answer 10-45%, prompt + longer answer <= seq - 8,
so no library truncates and every row differs in length (as real human-preference rows do).
"""

import random

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had "
         "by not word but what some we can out other were all there when up use your how said an each she which "
         "do their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call first "
         "who may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three want "
         "air well also play small end put home read hand port large spell add even land here must big high such "
         "follow act why ask men change went light kind off need house picture try us again animal point mother "
         "world near build self earth father head stand own page should country found answer school grow study "
         "still learn plant cover food sun four between state keep eye never last let thought city tree cross farm "
         "hard start might story saw far sea draw left late run while press close night real life few north").split()


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def text_of(rng: random.Random, tok, tokens: int) -> str:
    """Sentences whose tokens (without special tokens) reach about `tokens`."""
    parts: list[str] = []
    while len(tok(" ".join(parts), add_special_tokens=False).input_ids) < tokens:
        parts.append(sentence(rng, rng.randrange(6, 18)))
    return " ".join(parts)


def chat_tokens(tok, messages) -> int:
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=False))


def dialogue_rows(n: int, seq: int, tok, seed: int = 0) -> list[dict]:
    """`n` conversational preference rows (prompt: list of messages; chosen / rejected: one assistant message)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        budget = int(seq * rng.uniform(0.5, 0.7))
        turns = rng.randrange(2, 6)
        prompt = []
        for i in range(turns):
            share = budget // (2 * turns - 1)
            prompt.append({"role": "user", "content": text_of(rng, tok, max(4, share - 6))})
            if i < turns - 1:
                prompt.append({"role": "assistant", "content": text_of(rng, tok, max(4, share - 6))})
        p = chat_tokens(tok, prompt)
        room = seq - 8 - p
        if p < seq // 2 or room < seq // 10 + 2 or int(seq * 0.45) < seq // 10 + 2:
            continue
        lengths = rng.sample(range(max(seq // 10, 8), max(min(room, int(seq * 0.45)), seq // 10 + 2) + 1), 2)
        chosen, rejected = ([{"role": "assistant", "content": text_of(rng, tok, k - 4)}] for k in lengths)
        if max(chat_tokens(tok, prompt + chosen), chat_tokens(tok, prompt + rejected)) > seq - 2:
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def synthetic_rows(n: int, seq: int, distinct: bool) -> list[dict]:
    """Rows whose prompt is seq/2 tokens with BOS (4 + one per digit with the built-in tokenizer) and whose answers
    are longer than the rest: both libraries cut the answers to seq/2 tokens, so each side is exactly `seq` tokens.
    (TRL 1.x dropped max_prompt_length and cuts only answers; a prompt that fits keeps both libraries' rules
    the same.) Identical rows unless `distinct`: then the order of batches cannot change the losses."""
    rng = random.Random(0)

    def digits(k):
        return " ".join(str(rng.randrange(10)) for _ in range(k))

    def row():
        return {"prompt": "sort: " + digits(seq // 2 - 4) + " =", "chosen": " " + digits(seq),
                "rejected": " " + digits(seq)}

    one = row()
    return [row() if distinct else dict(one) for _ in range(n)]

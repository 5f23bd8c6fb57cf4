"""A plain float64 reference of ../shared/reference/orpo-semantics.md, written from the doc (not from
alignkit_orpo) so the parity tests compare two independent readings of it."""

import torch

IGNORE = -100


def lcp_split(chosen, rejected):
    """Section 2: longest common prefix, with the space rule and TRL's prefix edge case."""
    n = min(len(chosen), len(rejected))
    cut = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            cut = i - 1 if (i > 0 and chosen[i - 1] == " ") else i
            break
    return chosen[:cut], chosen[cut:], rejected[cut:]


def to_text(tok, row):
    conv = lambda v: isinstance(v, list)  # noqa: E731
    prompt = row.get("prompt")
    chosen, rejected = row["chosen"], row["rejected"]
    if prompt is None or conv(prompt) != conv(chosen):
        prompt, chosen, rejected = lcp_split(chosen, rejected)
    if not conv(chosen):
        return prompt, chosen, rejected
    last = prompt[-1]["role"]
    p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last == "user",
                                continue_final_message=last == "assistant")
    c = tok.apply_chat_template(prompt + chosen, tokenize=False)
    r = tok.apply_chat_template(prompt + rejected, tokenize=False)
    k = 0
    while k < min(len(p), len(c), len(r)) and p[k] == c[k] == r[k]:
        k += 1
    return p[:k], c[k:], r[k:]


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize(tok, row, max_length, max_prompt_length, mode):
    """Section 3, steps 1-6: (chosen ids, chosen labels, rejected ids, rejected labels)."""
    prompt, chosen, rejected = to_text(tok, row)
    sides = []
    for answer in (chosen, rejected):
        full, p = encode(tok, prompt + answer), encode(tok, prompt)
        s = len(p) if p == full[: len(p)] else len(p) - 1
        sides.append([full[:s], full[s:]])
    for side in sides:
        if tok.bos_token_id is not None and (not side[0] or side[0][0] != tok.bos_token_id):
            side[0] = [tok.bos_token_id] + side[0]
        if not side[1] or side[1][-1] != tok.eos_token_id:
            side[1] = side[1] + [tok.eos_token_id]
    longer = max(len(sides[0][1]), len(sides[1][1]))
    for side in sides:
        if len(side[0]) + longer > max_length:
            side[0] = side[0][-max_prompt_length:] if mode == "keep_end" else side[0][:max_prompt_length]
    for side in sides:
        if len(side[0]) + longer > max_length:
            side[1] = side[1][: max_length - max_prompt_length]
    out = []
    for p, a in sides:
        out += [p + a, [IGNORE] * len(p) + a]
    return out


def batch_metrics(model64, rows, pad_id, beta):
    """Sections 4-6 for one batch, in float64."""
    n = len(rows)
    seqs = [r[0] for r in rows] + [r[2] for r in rows]
    labs = [r[1] for r in rows] + [r[3] for r in rows]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    labels = torch.tensor([lab + [IGNORE] * (T - len(lab)) for lab in labs])
    with torch.no_grad():
        logits = model64(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = torch.log_softmax(logits, -1)
    nll_sum, nll_count = 0.0, 0
    for i in range(n):
        for t in range(1, T):
            if mask[i, t]:
                nll_sum -= logp[i, t - 1, ids[i, t]]
                nll_count += 1
    nll = nll_sum / nll_count
    means = []
    for i in range(2 * n):
        vals = [logp[i, t - 1, labels[i, t]] for t in range(1, T) if labels[i, t] != IGNORE]
        means.append(sum(vals) / len(vals))
    lc, lr = torch.stack(means[:n]), torch.stack(means[n:])
    log_odds = (lc - lr) - (torch.log(-torch.expm1(lc)) - torch.log(-torch.expm1(lr)))
    log_sig = torch.nn.functional.logsigmoid(log_odds)
    return {
        "loss": nll - torch.mean(beta * log_sig), "nll_loss": nll, "rewards/chosen": (beta * lc).mean(),
        "rewards/rejected": (beta * lr).mean(), "rewards/accuracies": (beta * lc > beta * lr).double().mean(),
        "rewards/margins": (beta * lc - beta * lr).mean(), "logps/chosen": lc.mean(), "logps/rejected": lr.mean(),
        "logits/chosen": logits[:n, :-1].mean(), "logits/rejected": logits[n:, :-1].mean(),
        "log_odds_ratio": log_sig.mean(), "log_odds_chosen": log_odds.mean(),
    }


def eval_metrics(model, tok, rows, batch_size, beta=0.1, max_length=1024, max_prompt_length=512, mode="keep_end"):
    """Mean over batches, in data order, of every metric, with `eval_` names."""
    import copy

    model64 = copy.deepcopy(model).double().eval()
    tokenized = [tokenize(tok, r, max_length, max_prompt_length, mode) for r in rows]
    per_batch = [batch_metrics(model64, tokenized[i:i + batch_size], tok.pad_token_id, beta)
                 for i in range(0, len(tokenized), batch_size)]
    return {f"eval_{k}": float(sum(b[k] for b in per_batch) / len(per_batch)) for k in per_batch[0]}

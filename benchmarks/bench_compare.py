"""Head-to-head runs for benchmarks/orpo_speed.py --section: several libraries interleaved in rounds.

Each round runs every variant once (its own process, one after the other), so a load change on a shared
machine hits all of them alike; step times are the median over all rounds' timed steps, peak memory the
largest. Variants:

- alignkit: the default path (fused LM head; prefix sharing where the attention supports it)
- alignkit-unshared: the same with method.share_prompt=false
- trl: TRL 1.16's ORPOTrainer (trl.experimental.orpo)
- liger / liger-eager: TRL's trainer, batches and model body with Liger-Kernel's LigerFusedLinearORPOLoss
  (compiled=True / False) on the final hidden states instead of the logits and TRL's loss
"""

import os
import statistics
from pathlib import Path

VARIANTS = {
    "alignkit": ("alignkit", {}),
    "alignkit-unshared": ("alignkit", {"alignkit": {"share_prompt": False}}),
    "trl": ("trl", {}),
    "liger": ("liger", {"liger_compiled": True}),
    "liger-eager": ("liger", {"liger_compiled": False}),
}


def tokens_per_step(case: dict) -> int:
    """Real tokens of one step, both sides (prompt + answer each), as every library's model sees them unshared."""
    if case.get("data", "synthetic") != "dialogue":
        return 2 * case["pairs"] * case["seq"]
    from bench_data import chat_tokens, dialogue_rows

    from alignkit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    return sum(chat_tokens(tok, r["prompt"] + r[side]) for r in dialogue_rows(case["pairs"], case["seq"], tok)
               for side in ("chosen", "rejected"))


def run_rounds(case: dict, variants: list[str], rounds: int, run_worker, mem_limit_gb: float, timeout: float) -> dict:
    case = {**case, "tokens": tokens_per_step(case)}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            lib, extra = VARIANTS[v]
            runs[v].append(run_worker(lib, {**case, **extra}, mem_limit_gb, timeout))
            print(v, {k: x for k, x in runs[v][-1].items() if k != "steps"}, flush=True)
    row = {"case": case}
    for v, results in runs.items():
        ok = [r for r in results if r.get("status") == "ok"]
        if not ok:
            row[v] = results[-1]
            continue
        steps = [s for r in ok for s in r["steps"]]
        step_s = statistics.median(steps)
        row[v] = {"status": "ok", "step_s": step_s, "tokens_per_s": case["tokens"] / step_s,
                  "peak_mb": max(r["peak_mb"] for r in ok), "losses": ok[0]["losses"], "rounds": len(ok),
                  **({"mfu": statistics.median(r["mfu"] for r in ok)} if "mfu" in ok[0] else {})}
    return row


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def ratio(x: dict, other: dict, key: str) -> str:
    ok = x.get("status") == "ok" and other.get("status") == "ok"
    return fmt(x[key] / other[key], ".2f") if ok else "-"


def table(rows: list[dict], variants: list[str]) -> list[str]:
    cols = ["data", "vocab", "seq", "pairs", "tokens/step", "variant", "s/step", "tokens/s", "peak MB", "step-1 loss",
            "time vs TRL", "time vs Liger", "memory vs TRL", "memory vs Liger"]
    if any(r[v].get("mfu") is not None for r in rows for v in variants if v in r):
        cols.append("MFU")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        c = r["case"]
        trl, liger = r.get("trl", {}), r.get("liger", {})
        for v in variants:
            x = r.get(v, {})
            ok = x.get("status") == "ok"

            cells = [c.get("data", "synthetic"), c["vocab"], c["seq"], c["pairs"], c["tokens"], v,
                     fmt(x.get("step_s"), ".2f") if ok else x.get("status", "-"), fmt(x.get("tokens_per_s"), ".0f"),
                     fmt(x.get("peak_mb"), ".0f"), fmt((x.get("losses") or [None])[0], ".4f"),
                     ratio(x, trl, "step_s"), ratio(x, liger, "step_s"), ratio(x, trl, "peak_mb"),
                     ratio(x, liger, "peak_mb")]
            if "MFU" in cols:
                cells.append(fmt(x.get("mfu"), ".1%"))
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


def write_section(path: Path, title: str, lines: list[str]) -> None:
    """Replace the section `## title` of the results file (or append it)."""
    text = path.read_text() if path.exists() else ""
    head = f"## {title}\n"
    body = head + "\n" + "\n".join(lines) + "\n\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def liger_trainer(base, compiled: bool):
    """TRL's ORPOTrainer (same batches, same model forward up to the final norm) with Liger-Kernel's
    LigerFusedLinearORPOLoss in place of the logits and TRL's loss."""
    from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss

    class LigerORPOTrainer(base):
        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                           device=self.accelerator.device)
            ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            nll_target = ids.masked_fill(mask == 0, -100)  # TRL's NLL targets: every real token
            if not hasattr(self, "_liger"):
                self._liger = LigerFusedLinearORPOLoss(beta=self.beta, compiled=compiled)
            head = model.lm_head
            out = self._liger(head.weight, hidden[:, :-1], cat["concatenated_labels"][:, 1:], head.bias,
                              nll_target=nll_target[:, 1:])
            return out[0], {}

    return LigerORPOTrainer


def peak_flops() -> float:
    """Dense bf16 peak of the GPU (H100/H200 SXM: 989 TFLOP/s), or ALIGNKIT_PEAK_TFLOPS."""
    import torch

    if os.environ.get("ALIGNKIT_PEAK_TFLOPS"):
        return float(os.environ["ALIGNKIT_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    return 989e12 if ("H100" in name or "H200" in name) else float("nan")


def liger_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("liger-kernel")
    except md.PackageNotFoundError:
        return "not installed"


def methods_table(results: list[dict], methods: list[str]) -> list[str]:
    """Peak memory and step time of other alignkit methods against alignkit's ORPO on the same case."""
    lines = ["| vocab | seq | pairs | grad ckpt | method | s/step | peak MB | peak MB ORPO | memory vs ORPO | first "
             "losses |",
             "|" + "---|" * 10]
    for r in results:
        c, orpo = r["case"], r["alignkit"]
        for m in methods:
            x = r.get(m, {})
            ok = x.get("status") == "ok" and orpo.get("status") == "ok"
            lines.append(f"| {c['vocab']} | {c['seq']} | {c['pairs']} | {'yes' if c['gc'] else 'no'} | {m} | "
                         f"{fmt(x.get('step_s'), '.3f') if ok else x.get('status', '-')} | "
                         f"{fmt(x.get('peak_mb'), '.0f')} | "
                         f"{fmt(orpo.get('peak_mb'), '.0f')} | "
                         f"{fmt(x['peak_mb'] / orpo['peak_mb'], '.2f') if ok else '-'} | "
                         f"{' '.join(f'{v:.4f}' for v in x.get('losses', []))} |")
    return lines

"""Prefix sharing against the unshared path: ORPO loss forward + backward, alternated in one process.

    python benchmarks/share_speed.py --layers 6 --seq 512 --pairs 1 --repeats 3

A random Qwen2 with Qwen2-0.5B's width (hidden 896, MLP 4864, 14/2 heads) and `--layers` layers, vocab
151,936, tied; the rows are bench_data.py's multi-turn dialogues (prompt 50-83% of the row). Shared and
unshared runs alternate (`--repeats` each, after one warm-up each), so load changes on a shared machine
hit both alike; reported: median seconds per forward + backward, tokens/s (real tokens of both rows), and
that loss and gradients agree.
"""

import argparse
import statistics
import time

import torch
from bench_data import dialogue_rows
from transformers import AutoModelForCausalLM, Qwen2Config

from alignkit.testing import tiny_tokenizer
from alignkit_orpo import ORPOLoss, ORPOMethodConfig, PreferenceFormatter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tok = tiny_tokenizer()
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    method = ORPOMethodConfig(max_length=args.seq, max_prompt_length=args.seq // 2)
    formatter = PreferenceFormatter(method, tok)
    formatter.prepare_model(model)
    features = [formatter.format(r) for r in dialogue_rows(args.pairs, args.seq, tok)]
    batch = formatter.collate([f.features if hasattr(f, "features") else f for f in features])
    tokens = int(batch["attention_mask"].sum())
    losses = {}
    for share in (True, False):
        losses[share] = ORPOLoss(ORPOMethodConfig(share_prompt=share))
        losses[share].prepare_model(model)

    def step(share):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = losses[share](model, batch)
        loss = out.normalized(losses[share].counts(batch))
        loss.backward()
        return time.perf_counter() - start, float(loss), model.model.embed_tokens.weight.grad.clone()

    times = {True: [], False: []}
    for i in range(args.repeats + 1):
        for share in (True, False):
            seconds, loss, grad = step(share)
            if i:
                times[share].append(seconds)
            print(f"share={share} {seconds:.2f} s loss {loss:.6f}", flush=True)
            if share:
                ref_loss, ref_grad = loss, grad
            else:
                grad_error = float((grad - ref_grad).norm() / ref_grad.norm())
                loss_error = abs(loss - ref_loss) / abs(ref_loss)
    shared, unshared = statistics.median(times[True]), statistics.median(times[False])
    print(f"layers {args.layers}, seq {args.seq}, pairs {args.pairs}, {tokens} real tokens; shared {shared:.2f} s "
          f"({tokens / shared:.0f} tokens/s), unshared {unshared:.2f} s ({tokens / unshared:.0f} tokens/s): "
          f"{unshared / shared:.2f}x; loss rel. diff {loss_error:.1e}, embedding grad rel. diff {grad_error:.1e}")


if __name__ == "__main__":
    main()

"""Run by test_orpo_chunked under torchrun (2 CPU processes): FSDP2 fully_shard per layer and root, on gloo;
chunked (fused head) and plain ORPO give the same metrics and gradients, and so do SFT and KTO (the fused head's
token- and row-level variants)."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from alignkit.testing import tiny_model
from alignkit_orpo import ORPOLoss, ORPOMethodConfig

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "kto"))  # test_kto
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # helpers
from test_orpo_chunked import ragged_batch  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
b = ragged_batch(4, seed=rank)
res = {}
# chunk 5: every pair is over a chunk (the head runs twice); chunk 64: whole pairs per chunk (once)
for impl, chunk in (("plain", 5), ("chunked", 5), ("chunked", 64)):
    model = tiny_model(tie_word_embeddings=False)
    loss_fn = ORPOLoss(ORPOMethodConfig(loss_implementation=impl, logits_chunk_size=chunk))
    loss_fn.prepare_model(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    out = loss_fn(model, b)
    out.normalized(loss_fn.counts(b)).backward()
    res[impl, chunk] = ({k: v.item() for k, v in out.metrics.items()},
                 {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()})
m0, g0 = res["plain", 5]
worst = mworst = 0.0
for chunk in (5, 64):
    m1, g1 = res["chunked", chunk]
    worst = max([worst] + [((g1[n] - g0[n]).norm() / g0[n].norm()).item() for n in g0])
    mworst = max([mworst] + [abs(m1[k] - m0[k]) / max(abs(m0[k]), 1e-3) for k in m0])
# one write per line (atomic on a pipe): print() writes the newline apart, and the two ranks' lines could interleave
sys.stdout.write(f"RESULT {worst} {mworst}\n")
sys.stdout.flush()


def sharded_grads(loss_fn, batch, **kwargs):
    """(loss, full gradients) of one backward through a model sharded per layer and at the root."""
    model = tiny_model(tie_word_embeddings=False)
    loss_fn.prepare_model(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    out = loss_fn(model, batch, **kwargs)
    total = out.normalized({u: float(c) for u, c in loss_fn.counts(batch).items()})
    total.backward()
    return total.item(), {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}


def worst_of(a, b):
    (la, ga), (lb, gb) = a, b
    return max([abs(la - lb) / max(abs(lb), 1e-3)] + [((ga[n] - gb[n]).norm() / gb[n].norm()).item() for n in gb])


# SFT and KTO on the fused head (token- and row-level variants) against their plain paths, sharded the same way
from alignkit_kto import KTOConfig, KTOLoss  # noqa: E402
from alignkit_sft import SFTConfig, SFTLoss  # noqa: E402
from test_kto import ROWS, batch_of  # noqa: E402

ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(rank))
mask = torch.ones_like(ids)
mask[0, 6:] = 0
labels = ids.masked_fill(mask == 0, -100)
labels[:, :3] = -100
sft_batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
sft = [sharded_grads(SFTLoss(SFTConfig(loss_implementation=impl, logits_chunk_size=4)), sft_batch)
       for impl in ("chunked", "plain")]
kto_batch = batch_of(ROWS)
kto = []
for impl in ("chunked", "plain"):
    loss_fn = KTOLoss(KTOConfig(beta=0.3, loss_implementation=impl, logits_chunk_size=3))
    with torch.no_grad():
        ref = loss_fn.reference(tiny_model(seed=5), kto_batch)
    kto.append(sharded_grads(loss_fn, kto_batch, ref=ref))
sys.stdout.write(f"RESULT_TOKEN_ROW {worst_of(*sft)} {worst_of(*kto)}\n")
sys.stdout.flush()
dist.destroy_process_group()

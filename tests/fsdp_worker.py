"""Run by test_orpo_chunked under torchrun (2 CPU processes): FSDP2 fully_shard per layer and root, on gloo;
chunked (fused head) and plain ORPO give the same metrics and gradients."""
import os
import sys

import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from alignkit.testing import tiny_model
from alignkit_orpo import ORPOLoss, ORPOMethodConfig

sys.path.insert(0, os.path.dirname(__file__))
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
print(f"RESULT {worst} {mworst}", flush=True)
dist.destroy_process_group()

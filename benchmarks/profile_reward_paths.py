"""torch.profiler of one reward loss forward + backward, padded batch vs shared prompt (method.share_prompt), on
methods_vs_trl.py's rows and model (vocab 32000, seq 2048, 2 pairs): top ops by self time and by allocation.

    python benchmarks/profile_reward_paths.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from alignkit_reward import RewardConfig, RewardFormatter, RewardLoss  # noqa: E402
from methods_vs_trl import method_rows, save_models  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


def main() -> None:
    case = dict(method="reward", vocab=32000, seq=2048, pairs=2, size="small", device="cpu")
    folder = Path(tempfile.mkdtemp())
    save_models(case, folder)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model")
    cfg = RewardConfig(max_length=case["seq"])
    fmt = RewardFormatter(cfg, tok)
    batch = fmt.collate([fmt.format(r).features for r in method_rows("reward", case)])
    print("batch", tuple(batch["input_ids"].shape), "real tokens", int(batch["attention_mask"].sum()))
    for share in (False, True):
        loss = RewardLoss(cfg.model_copy(update={"share_prompt": share}))
        loss.prepare_model(model)
        model.zero_grad()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = loss(model, batch)
            out.terms["pairs"].backward()
        print(f"==== share_prompt={share}: loss {out.terms['pairs'].item():.6f}")
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))
        print(averages.table(sort_by="self_cpu_memory_usage", row_limit=5, max_name_column_width=40))


if __name__ == "__main__":
    main()

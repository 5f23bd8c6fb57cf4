"""CPO (Xu et al., arXiv 2401.08417): sigmoid loss on summed completion log-probs plus the chosen NLL."""

import torch
import torch.nn.functional as F
from pydantic import Field

import alignkit


class CPOConfig(alignkit.MethodConfig):
    name: str = "cpo"
    beta: float = Field(0.1, gt=0, description="Temperature of the preference term.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed probability that a preference label is flipped.")
    cpo_alpha: float = Field(1.0, ge=0, description="Weight of the NLL on the chosen completions.")


class CPOLoss(alignkit.Loss):
    eval_loss_per_batch = True  # eval_loss: the mean of per-batch losses, as TRL computes it
    def counts(self, batch):
        n = batch["input_ids"].shape[0] // 2
        return {"pairs": n, "chosen_tokens": int((batch["labels"][:n, 1:] != -100).sum())}

    def __call__(self, model, batch):
        beta, smoothing, n = self.config.beta, self.config.label_smoothing, batch["input_ids"].shape[0] // 2
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        token_logps, mask = alignkit.shifted_token_logps(logits, batch["labels"], -100)
        summed = token_logps.sum(-1)
        chosen, rejected = summed[:n], summed[n:]
        margin = chosen - rejected
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
        nll_sum = -token_logps[:n].sum()
        with torch.no_grad():
            metrics = {"rewards/chosen": beta * chosen.mean(), "rewards/rejected": beta * rejected.mean(),
                       "rewards/accuracies": (chosen > rejected).to(summed.dtype).mean(),
                       "rewards/margins": beta * margin.mean(), "logps/chosen": chosen.mean(),
                       "logps/rejected": rejected.mean(), "logits/chosen": logits[:n].mean(),
                       "logits/rejected": logits[n:].mean(), "nll_loss": nll_sum / mask[:n].sum()}
        return alignkit.LossOutput(terms={"pairs": losses.sum(), "chosen_tokens": self.config.cpo_alpha * nll_sum},
                                   metrics=metrics)


#: the demo (tiny built-in model, ORPO's built-in sorting pairs by name): one epoch at a high learning rate
DEMO_DEFAULTS = {
    "train.learning_rate": 3e-3, "train.num_train_epochs": 1, "train.per_device_train_batch_size": 16,
    "train.per_device_eval_batch_size": 50, "train.warmup_ratio": 0.05, "train.logging_steps": 10,
    "train.eval_steps": 50, "train.save_steps": 100, "train.save_total_limit": 2, "train.eval_on_start": True,
}


@alignkit.hookimpl
def register_methods(register):
    register(alignkit.Method(name="cpo", config=CPOConfig, formatter="preference", loss=CPOLoss,
                             description="Contrastive Preference Optimization: sigmoid preference loss plus NLL, no reference.",
                             defaults={"train.learning_rate": 1e-6},
                             demo_data="sort", demo_defaults=DEMO_DEFAULTS, progress_metrics=("rewards/accuracies",),
                             citation="@article{xu2024cpo, title={Contrastive Preference Optimization: Pushing the "
                                      "Boundaries of LLM Performance in Machine Translation}, journal={arXiv:2401.08417}, year={2024}}"))

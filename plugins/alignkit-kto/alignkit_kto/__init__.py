"""alignkit_kto: KTO (Ethayarajh et al., arXiv 2402.01306) as an alignkit method plugin."""

from alignkit import Method, hookimpl, registers
from alignkit.blocks.demo import demo_defaults
from alignkit_kto import demo
from alignkit_kto.config import KTOConfig
from alignkit_kto.formatter import KTOFormatter
from alignkit_kto.loss import KTOLoss, kto_losses

CITATION = """@article{ethayarajh2024kto,
  title={KTO: Model Alignment as Prospect Theoretic Optimization},
  author={Ethayarajh, Kawin and Xu, Winnie and Muennighoff, Niklas and Jurafsky, Dan and Kiela, Douwe},
  journal={arXiv preprint arXiv:2402.01306},
  year={2024}
}"""

METHOD = Method(
    name="kto",
    config=KTOConfig,
    formatter=KTOFormatter,  # the core's "unpaired-preference" (KL pairs fixed at preprocessing) with KTO's checks
    loss=KTOLoss,
    description="Kahneman-Tversky Optimization: unpaired desirable/undesirable examples against a frozen reference.",
    defaults={"train.learning_rate": 1e-6},
    citation=CITATION,
    demo_data=demo.NAME,
    demo_defaults=demo_defaults(learning_rate=2e-3),
    progress_metrics=("rewards/margins", "kl"),
)


register_methods = registers(METHOD)


@hookimpl
def register_datasets(register):
    register(demo.NAME, demo.load)


__all__ = ["KTOConfig", "KTOFormatter", "KTOLoss", "METHOD", "kto_losses"]

"""The model card (README.md) written beside a trained model."""

import json
import platform
from importlib.metadata import PackageNotFoundError, version

from alignkit.config import RunConfig, recorded, redact, to_yaml
from alignkit.engine.modeling import KINDS
from alignkit.plugin.method import Method

LIBRARIES = ("alignkit", "torch", "transformers", "accelerate", "datasets", "peft")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def model_card(config: RunConfig, method: Method, metrics: dict[str, float], tags: list[str] = (),
               notes: list[str] = (), kind: str | None = None) -> str:
    """Markdown with front matter: base model, data, method and citation, config, final metrics, versions.
    Values given as `${oc.env:...}` appear as that interpolation, in metric names too. `kind`: the saved model's
    kind where the model decides it (a vision-language model); default: the method's."""
    metrics = {redact(k, config): v for k, v in metrics.items()}
    config = recorded(config)
    all_tags = ["alignkit", method.name, *[t for t in tags if t not in ("alignkit", method.name)]]
    datasets = [d for d in (config.data.train, config.data.eval) if d and not d.startswith("builtin:")]
    kind_name = kind or method.model_kind
    kind = KINDS[kind_name]
    pipeline, auto = kind.pipeline, kind.auto.__name__ + (" (the value head: keys v_head.summary.*)"
                                                           if kind.value_head else "")
    front = ["---", f"base_model: {json.dumps(config.model.name_or_path)}", "library_name: transformers",
             f"pipeline_tag: {pipeline}", "tags:", *[f"- {t}" for t in all_tags]]
    front += ["datasets:", *[f"- {json.dumps(d)}" for d in dict.fromkeys(datasets)]] if datasets else []
    front.append("---")
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
    versions = "\n".join(f"- {name}: {_version(name)}" for name in LIBRARIES)
    resumed = "".join(f"\nR{n.removeprefix('# r')}." for n in notes)  # "# resumed at step ..." lines
    held_out = f"held-out fraction {config.data.eval_fraction}" if config.data.eval_fraction else "none"
    citation = f"\n## Citation\n\n```bibtex\n{method.citation.strip()}\n```\n" if method.citation else ""
    return f"""{chr(10).join(front)}

# {config.train.output_dir.rstrip('/').split('/')[-1]}

Trained with [alignkit](https://github.com/alignkit/alignkit), method **{method.name}**: {method.description}

- base model: `{config.model.name_or_path}`
- model kind: {kind_name}{f' ({method.num_labels} labels)' if kind.labels else ''}, \
loads with `{auto}.from_pretrained`
- training data: `{config.data.train}` (split `{config.data.train_split}`)
- eval data: `{config.data.eval or held_out}`

## Final metrics

| metric | value |
|---|---:|
{rows}

## Config

Reproduce with `alignkit run -c config.yaml`:{resumed}

```yaml
{to_yaml(config, comments=False).rstrip()}
```

## Versions

{versions}
- python: {platform.python_version()}
{citation}"""

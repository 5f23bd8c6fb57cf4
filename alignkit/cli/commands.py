"""The command line: a thin shell over alignkit.api. User errors: one line on stderr, exit code 2."""

import json
import logging
import os
import sys

import click

from alignkit import api
from alignkit.config import to_yaml
from alignkit.errors import AlignkitError, TrainingInterrupted
from alignkit.plugins import build_registry, get_plugin_manager


class _OneLine(click.ClickException):
    """click's own errors (unknown option, invalid value, missing argument) in alignkit's form: one line, exit 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"alignkit: error: {self.message}", err=True)


def _one_line(e: click.ClickException) -> _OneLine:
    message = " ".join(e.format_message().split())  # one line, whatever click put in it
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        names = []
        while ctx.parent is not None:  # the subcommand's name (the program's own is alignkit, however invoked)
            names.insert(0, ctx.info_name)
            ctx = ctx.parent
        message = "".join(f"{n}: " for n in names) + f"{message} (see {' '.join(['alignkit', *names])} --help)"
    return _OneLine(message)


class _Cli(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):  # the group's own options and command name
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as e:
            raise _one_line(e) from None

    def resolve_command(self, ctx: click.Context, args):
        try:
            return super().resolve_command(ctx, args)
        except click.ClickException as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (_OneLine, click.exceptions.NoArgsIsHelpError):
            raise
        except click.ClickException as e:  # a command's own options and arguments
            raise _one_line(e) from None
        except AlignkitError as e:
            click.echo(f"alignkit: error: {e}", err=True)
            ctx.exit(2)
        except TrainingInterrupted as e:
            click.echo(f"alignkit: stopped: {e}", err=True)
            ctx.exit(128 + e.signum)


def _setup_logging(verbosity: int) -> None:
    import datasets
    import transformers

    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("accelerate", "datasets", "filelock", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING)
    transformers.logging.set_verbosity_error() if verbosity < 1 else transformers.logging.set_verbosity_info()
    if verbosity < 0:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(quiet: bool, verbose: bool) -> None:
    """alignkit: LLM post-training, one engine, methods as plugins.

    \b
    alignkit methods                              list the installed methods
    alignkit environments                         list the environments for multi-turn rollouts
    alignkit run --method NAME                    the built-in demo: tiny model, offline, seconds on a CPU
    alignkit run --method NAME -c my.yaml train.max_steps=100
    alignkit config --method NAME > my.yaml       every key, with its default and description
    alignkit format --method NAME                 how the training examples are tokenized
    alignkit rollout --method NAME -n 2           an online method's samples, turn by turn
    alignkit plot outputs/NAME                    charts of a run's metrics
    alignkit chat --model outputs/NAME            talk to the trained model
    """
    _setup_logging(-1 if quiet else 1 if verbose else 0)


_method = click.option("-m", "--method", help="Method name (see `alignkit methods`).")
_config = click.option("-c", "--config", "config_file", metavar="FILE",  # checked by the config loader: one line
                       help="YAML config; KEY=VALUE arguments override it.")
_overrides = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
_passthrough = {"ignore_unknown_options": False}


@cli.command(context_settings=_passthrough)
@_method
@_config
@_overrides
def run(method, config_file, overrides):
    """Train a method.

    \b
    alignkit run --method NAME
    alignkit run --method NAME -c my.yaml train.max_steps=50 data.train=pairs.jsonl
    """
    from alignkit.config import redact

    result = api.run(method, config_file, **_dotlist(overrides))  # metric names as written: no ${oc.env:...} values
    click.echo(json.dumps({"output_dir": str(result.output_dir), "global_step": result.global_step,
                           **{redact(k, result.config): v for k, v in result.metrics.items()}}, indent=2))


@cli.command("eval", context_settings=_passthrough)
@_method
@_config
@_overrides
def eval_(method, config_file, overrides):
    """Evaluate model.name_or_path on data.eval (or data.train); print and save the metrics.

    A run's output folder brings its method and the settings it was evaluated with (data, method settings, eval
    batch size), so the numbers equal training's last evaluation; KEY=VALUE overrides them. With no model the
    untrained built-in model is evaluated (a warning says so).

    \b
    alignkit eval model.name_or_path=outputs/NAME
    alignkit eval --method NAME model.name_or_path=outputs/NAME data.eval=pairs.jsonl
    """
    click.echo(json.dumps(api.evaluate(method, config_file, **_dotlist(overrides)), indent=2))


@cli.command()
def methods():
    """List the installed methods with their distribution and version, and plugins that failed to load.

    \b
    alignkit methods
    ALIGNKIT_LOAD_PLUGINS=alignkit,my-plugin alignkit methods       only these distributions
    """
    registry = build_registry(get_plugin_manager())
    for m in sorted(registry.methods.values(), key=lambda m: m.name):
        click.echo(f"{m.name:<12} {m.source} {m.version}  {m.description}")
    for b in registry.broken:
        click.echo(f"(broken)     {b.dist}: {b.error}", err=True)
    if not registry.methods:
        click.echo("no methods installed", err=True)


@cli.command()
def environments():
    """List the environments for multi-turn rollouts (method.environment=NAME) with their distribution and tools.

    \b
    alignkit environments
    alignkit run --method NAME method.environment=calculator
    """
    from alignkit.online.environments import EnvironmentRegistry

    registry = EnvironmentRegistry.from_plugins(get_plugin_manager())
    for name, (factory, source) in sorted(registry.factories.items()):
        tools = [getattr(fn, "__name__", "?") for fn in getattr(factory, "tools", ()) or ()]
        listed = f" (tools: {', '.join(tools)})" if tools else ""
        click.echo(f"{name:<12} {source}  {registry.describe(name)}{listed}")


@cli.command(context_settings=_passthrough)
@_method
@_config
@click.option("--schema", is_flag=True, help="Print the JSON schema of the whole config instead.")
@_overrides
def config(method, config_file, schema, overrides):
    """Print the full resolved config as commented YAML that -c accepts (or its JSON schema).

    \b
    alignkit config --method NAME > my.yaml
    alignkit config --method NAME --schema
    """
    cfg, _ = api.load_config(method, config_file, _dotlist(overrides))
    if schema:
        click.echo(json.dumps(type(cfg).model_json_schema(), indent=2))
    else:
        click.echo(to_yaml(cfg), nl=False)


@cli.command("format", context_settings=_passthrough)
@_method
@_config
@click.option("-n", "--n", "count", default=3, show_default=True, help="How many training examples to show.")
@_overrides
def format_(method, config_file, count, overrides):
    """Show how the method's formatter turns training examples into tokens, and which are labelled targets.

    Labelled tokens (label != -100) are [[bracketed]] (green on a terminal); masked ones are plain.

    \b
    alignkit format --method NAME -n 2
    alignkit format --method NAME data.train=pairs.jsonl method.max_length=64
    """
    from alignkit.cli.format_view import show_examples

    cfg, chosen = api.load_config(method, config_file, _dotlist(overrides))
    click.echo(show_examples(cfg, chosen, count, color=sys.stdout.isatty()), nl=False)


@cli.command(context_settings=_passthrough)
@_method
@_config
@click.option("-n", "--n", "count", default=2, show_default=True, help="How many training prompts to roll out.")
@_overrides
def rollout(method, config_file, count, overrides):
    """Show one rollout of an online method: each sample turn by turn, which tokens are trained, its rewards.

    Trained tokens (the model's own) are [[bracketed]] (green on a terminal); the environment's are plain.

    \b
    alignkit rollout --method NAME -n 2
    alignkit rollout --method NAME method.environment=calculator data.train=builtin:arithmetic
    """
    from alignkit.cli.rollout_view import show_rollout

    cfg, chosen = api.load_config(method, config_file, _dotlist(overrides))
    click.echo(show_rollout(cfg, chosen, count, get_plugin_manager(), color=sys.stdout.isatty()), nl=False)


@cli.command()
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", "dest", type=click.Path(file_okay=False), help="Folder for the PNGs [OUTPUT_DIR/plots].")
def plot(output_dir, dest):
    """Draw OUTPUT_DIR/metrics.jsonl as PNG charts: one per metric panel, plus overview.png.

    Losses share a panel, X/chosen shares one with X/rejected, any other metric has its own; train and
    eval values of a metric share the axes. Training writes the same charts at its end (train.plots).

    \b
    alignkit plot outputs/run1
    alignkit plot outputs/run1 -o /tmp/charts
    """
    from alignkit.engine.plots import plot_metrics

    for path in plot_metrics(output_dir, dest):
        click.echo(str(path))


_model = click.option("--model", "model_dir", required=True,
                      help="A run's output_dir, a LoRA adapter folder or a hub name.")
_sampling = [
    click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
                 help="At most this many new tokens (cut to what the model's context leaves after the prompt)."),
    click.option("--temperature", type=click.FloatRange(min=0),
                 help="Sample at this temperature; 0 decodes greedily.  [default: as the model's "
                 "generation_config.json "
                      "says: greedy for a run's model]"),
    click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1),
                 help="Nucleus sampling with --temperature."),
    click.option("--seed", type=int, help="Seed for sampling."),
    click.option("--system", help="A system message (chat template only)."),
    click.option("--image", "images", multiple=True, metavar="PATH",
                 help="A picture for a vision-language model to read with the prompt (repeatable; through the chat "
                      "template the images go into the first user turn)."),
]


def _sampling_options(f):
    for option in reversed(_sampling):
        f = option(f)
    return f


def _echo(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


@cli.command()
@_model
@click.argument("prompt")
@click.option("--raw/--chat-template", default=None,
              help="Feed the prompt as plain text, or as a user message through the chat template "
                   "  [default: as the model was trained: plain text if its training data was]")
@_sampling_options
def generate(model_dir, prompt, raw, max_new_tokens, temperature, top_p, seed, system, images):
    """Complete PROMPT with a trained model, streaming the answer; its tokens are built as the run's formatter built
    prompts (plain text for a model trained on plain text, else through the chat template if it has one).

    \b
    alignkit generate --model outputs/run1 "sort: 3 1 2 ="
    alignkit generate --model outputs/run1 --temperature 0 --max-new-tokens 32 "sort: 9 4 ="
    alignkit generate --model outputs/run1 --raw "Once upon a time"
    alignkit generate --model outputs/my-vlm --image pics/red.png "What colour are the shapes?"
    """
    from alignkit.cli.generate import Sampling, generate, load, trained
    from alignkit.cli.images import ImagePrompt, read_images

    if not prompt.strip():
        raise AlignkitError('PROMPT is empty; give the text to complete, e.g. '
                            f'alignkit generate --model {model_dir} "sort: 3 1 2 ="')
    pictures = read_images(images)
    model, tokenizer = load(model_dir)
    how = trained(model_dir, tokenizer)
    generate(model, tokenizer, prompt, Sampling(max_new_tokens, temperature, top_p, seed), _echo, raw=raw,
             system=system, how=how, images=ImagePrompt.of(pictures, tokenizer, model_dir, how.bos_first))
    click.echo()


@cli.command()
@_model
@_sampling_options
def chat(model_dir, max_new_tokens, temperature, top_p, seed, system, images):
    """Talk to a trained model: each turn goes through its chat template with the history, answers stream.

    In the chat: /clear starts over, /system TEXT sets the system message, /exit or Ctrl-D quits.

    \b
    alignkit chat --model outputs/run1
    alignkit chat --model outputs/run1 --temperature 0 --system "Answer briefly."
    alignkit chat --model outputs/my-vlm --image pics/red.png
    """
    from alignkit.cli.generate import Sampling, chat, load, trained
    from alignkit.cli.images import ImagePrompt, read_images

    pictures = read_images(images)
    model, tokenizer = load(model_dir)
    how = trained(model_dir, tokenizer)
    pictures = ImagePrompt.of(pictures, tokenizer, model_dir, how.bos_first)

    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates, line by line
        sys.stdin.reconfigure(errors="surrogateescape")

    def turns():
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
                line.encode("utf-8")
                yield line
            except (UnicodeDecodeError, UnicodeEncodeError):
                click.echo("alignkit: that input is not valid UTF-8 text; type it again", err=True)
            except (EOFError, click.Abort):
                return

    chat(model, tokenizer, turns(), Sampling(max_new_tokens, temperature, top_p, seed), _echo, system=system, how=how,
         images=pictures)


from alignkit.cli.merge import merge  # noqa: E402 (registered after the group exists)
from alignkit.cli.vllm_serve import vllm_serve  # noqa: E402

cli.add_command(merge)
cli.add_command(vllm_serve)


def _dotlist(overrides: tuple[str, ...]) -> dict:
    out = {}
    for item in overrides:
        if "=" not in item:
            raise AlignkitError(f"argument {item!r} must be KEY=VALUE, e.g. train.max_steps=10")
        key, value = item.split("=", 1)
        try:
            out[key] = _parse_value(value)
        except AlignkitError as e:
            raise AlignkitError(f"argument {key}: {e}") from None
    return out


def _parse_value(value: str):
    """YAML-typed value as omegaconf's dotlist reads it ('1e-6' -> float, 'null' -> None, '[a,b]' -> list)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from alignkit.config import refuse_tags

    try:
        refuse_tags(value, f"value {value!r}", positions=False)
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        problem = getattr(e, "problem", None)
        first = problem or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise AlignkitError(f"value {value!r} cannot be parsed ({first}); quote it, or write a list as [a,b]") from None


def main() -> None:
    try:
        cli(prog_name="alignkit")  # click ends with SystemExit(code)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    exit_process(code)


def exit_process(code) -> None:
    """Exit with `code`. A process of a multi-process run first tears its process group down, flushes, and leaves
    with os._exit: in the interpreter's own shutdown, the communication library's threads can be destroyed while
    still running, and a process that finished its run aborts ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        raise SystemExit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)

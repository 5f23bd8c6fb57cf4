"""The hooks a plugin may implement. Every hook is documented in docs/hooks.md (a test checks).

The lifecycle hooks (on_*) of a plugin that registers methods run only for runs of its own methods,
unless the plugin sets `alignkit_all_runs = True`; a plugin that registers no method sees every run.
"""

import pluggy

PROJECT = "alignkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def registers(*methods):
    """A `register_methods` implementation that registers `methods` (alignkit.Method objects), for a plugin module
    whose hook would only do that: `register_methods = alignkit.registers(alignkit.Method(...))`."""

    @hookimpl
    def register_methods(register):
        for method in methods:
            register(method)

    return register_methods


@hookspec
def register_methods(register):
    """Register training methods by calling register(Method(...)) once per method."""


@hookspec
def register_formatters(register):
    """Register reusable data formatters by calling register(name, FormatterClass)."""


@hookspec
def register_losses(register):
    """Register reusable losses by calling register(name, LossClass)."""


@hookspec
def register_datasets(register):
    """Register built-in datasets by calling register(name, loader); loader(split) returns a datasets.Dataset
    for split "train" or "test". Used as data.train=builtin:NAME and as a method's demo_data."""


@hookspec
def on_train_start(run):
    """Called once before the first optimizer step, with model, data and state ready."""


@hookspec
def on_step_end(run, step, metrics):
    """Called after every optimizer step with that step's loss and method metrics."""


@hookspec
def on_log(run, step, logs):
    """Called every `train.logging_steps` steps with the metrics averaged over the window."""


@hookspec
def on_evaluate(run, step, metrics):
    """Called after each evaluation with its `eval_`-prefixed metrics."""


@hookspec
def on_save(run, step, path):
    """Called after a checkpoint has been written completely to `path`."""


@hookspec
def on_train_end(run, metrics):
    """Called once after training and the final save, with the last train and eval metrics."""


@hookspec
def register_rewards(register):
    """Register reward functions for online methods by calling register(name, fn);
    fn(prompts, completions, **row_columns) returns one float (or None) per completion."""


@hookspec
def register_environments(register):
    """Register environments for multi-turn rollouts by calling register(name, factory); factory(options) (or
    factory() without an `options_class`) builds one environment per episode (alignkit.online.environments)."""

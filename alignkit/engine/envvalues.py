"""Values given through `${oc.env:...}` (secrets, private paths): runs use the value, written files the interpolation.

`recorded(config)` is the config as it may be written or sent to a tracker, `redact` does the same for a name built
from a setting (a metric's), `environment_values` is what a checkpoint keeps to notice a changed value on resume (a
keyed hash, never the value or its plain digest), and `resolve_env` reads a recorded value back.
"""

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignkit.errors import ConfigError


def recorded(config):
    """The config as it may be written out: values from `${oc.env:...}` (secrets, private paths) replaced by
    the interpolation itself. Use it for anything written to disk or sent to a tracker."""
    if not config._recorded:
        return config

    def replace(node, parts: list[str], value: str):
        head = parts[0]
        if isinstance(node, list):  # inside a list setting, e.g. method.reward_funcs.0
            i = int(head)
            return [*node[:i], value if len(parts) == 1 else replace(node[i], parts[1:], value), *node[i + 1:]]
        if isinstance(node, dict):  # inside a dict-valued setting, e.g. model.init_kwargs.token
            return {**node, head: value if len(parts) == 1 else replace(node[head], parts[1:], value)}
        new = value if len(parts) == 1 else replace(getattr(node, head), parts[1:], value)
        return node.model_copy(update={head: new})

    out = config
    for key, value in config._recorded.items():
        out = replace(out, key.split("."), value)
    return out


def _value_at(config, key: str):
    node = config
    for part in key.split("."):
        if isinstance(node, (list, dict)):
            node = node[int(part) if isinstance(node, list) else part]
        else:
            node = getattr(node, part)
    return node


#: how a checkpoint records an environment value: a keyed hash, its random key beside it (never a plain digest)
_HMAC = "hmac-sha256"


def environment_values(config, like: Mapping[str, str] | None = None) -> dict[str, str]:
    """dotted key -> keyed hash (HMAC-SHA256 under a random per-run key) of the value it resolved to, for each key
    given through `${oc.env:...}`: written files hold the interpolation, so a resume compares these to notice a
    changed environment while the values stay unwritten and cannot be looked up. `like`: the record to compare
    with; its keys are reused, so an unchanged value gives the same record."""
    out = {}
    for key in config._recorded:
        data = json.dumps(_value_at(config, key), sort_keys=True, default=str).encode()
        kind, _, rest = str((like or {}).get(key, "")).partition(":")
        if kind == _HMAC:
            salt = rest.partition(":")[0]
        elif like and len(kind) == 64 and not rest:  # a checkpoint from before the keyed hash
            out[key] = hashlib.sha256(data).hexdigest()
            continue
        else:
            config._salt = salt = config._salt or secrets.token_hex(16)
        out[key] = f"{_HMAC}:{salt}:{hmac.new(bytes.fromhex(salt), data, hashlib.sha256).hexdigest()}"
    return out


def redact(text: str, config) -> str:
    """`text` (e.g. a metric name built from a setting) with each value that came from `${oc.env:...}` written as
    the interpolation it was given as. Strings of 4 characters or more only: shorter ones are no secret and
    would garble ordinary names."""
    found = {}
    for key, interpolation in config._recorded.items():
        value = _value_at(config, key)
        if isinstance(value, str) and len(value) >= 4:
            found[value] = interpolation
    for value in sorted(found, key=len, reverse=True):
        text = text.replace(value, found[value])
    return text


def resolve_env(text: str, what: str) -> str:
    """`text` with its `${oc.env:...}` interpolations resolved (a recorded value read back); `what` names it."""
    if "${" not in text:
        return text
    try:
        return str(OmegaConf.create({"v": text}).v)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{what}: {text} cannot be resolved here: {str(e).splitlines()[0]}") from None


def leaves(tree, prefix: str = ""):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def env_interpolations(raw: dict, plain: dict) -> dict[str, str]:
    """Keys given as (or through) an `${oc.env:...}` interpolation, with that interpolation."""
    raw_leaves, plain_leaves = dict(leaves(raw)), dict(leaves(plain))
    env = {k: v for k, v in raw_leaves.items() if isinstance(v, str) and "oc.env" in v}
    values = [str(plain_leaves[k]) for k in env if str(plain_leaves.get(k, ""))]
    for k, v in raw_leaves.items():  # e.g. data.eval: ${data.train} where data.train came from the environment
        if k not in env and isinstance(v, str) and "${" in v and any(s in str(plain_leaves.get(k)) for s in values):
            env[k] = v
    return env

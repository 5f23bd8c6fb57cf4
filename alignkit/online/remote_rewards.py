"""Remote rewards: `url:http://host:port/path` (or https) in method.reward_funcs (docs/online.md, "Rewards").

A scoring call posts its completions in requests of `rewards.remote_batch_size`, at most `rewards.remote_concurrency`
in flight, each the JSON object

    {"prompts": [...], "completions": [...], "columns": {"answer": [...], ...}}

(the arguments a local reward function gets: one entry per completion, the prompt rows' other columns by name), and
reads back `{"rewards": [number | null, ...]}` (or that bare list), one per completion of the request. A request
that gets no answer within `rewards.remote_timeout`, a broken connection, HTTP 429 or 5xx is tried again after
`rewards.remote_backoff` seconds (doubled before each next try), `rewards.remote_retries` times; after the last, and
at once for any other HTTP status or an answer of the wrong shape, a RemoteRewardError (one line naming the URL)
ends the run. A URL that is not http(s) is a ConfigError when the config is read, before any work.
"""

import asyncio
import http.client
import json
import math
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import SplitResult, urlsplit

from alignkit.errors import AlignkitError, ConfigError

URL_PREFIX = "url:"


class RemoteRewardError(AlignkitError):
    """A remote reward's server failed after its retries, or answered something that is not one reward per
    completion."""


class _Retry(Exception):
    """A failure that another try may not have."""


def check_url(name: str, key: str = "method.reward_funcs") -> SplitResult:
    """The parts of `url:URL`; a ConfigError naming `key` unless URL is http(s) with a host (and a numeric port)."""
    parts = urlsplit(name.removeprefix(URL_PREFIX))
    example = "e.g. url:http://127.0.0.1:8000/score"
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{key}: {name}: a remote reward's URL must start with http:// or https:// ({example})")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port when it is read)
    except ValueError as e:
        raise ConfigError(f"{key}: {name}: bad port ({e}; {example})") from None
    if not parts.hostname:
        raise ConfigError(f"{key}: {name}: the URL has no host ({example})")
    return parts


def _jsonable(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


class RemoteReward:
    """The reward `url:URL`: an async callable (awaited by alignkit.online.rewards.score with the other async
    rewards) posting each request from a thread pool of `remote_concurrency` workers."""

    probe_before_training = False  # check_data does not call it (no request before training)

    def __init__(self, name: str, settings=None) -> None:
        if settings is None:
            from alignkit.config import RewardsConfig  # the host's config (a lazy import: online/ sits below it)

            settings = RewardsConfig()
        self.name, self.url, self.parts, self.settings = name, name.removeprefix(URL_PREFIX), check_url(name), settings

    async def __call__(self, prompts: list, completions: list, **columns) -> list:
        size, loop = self.settings.remote_batch_size, asyncio.get_running_loop()
        starts = range(0, len(completions), size)
        pool = ThreadPoolExecutor(max(1, min(self.settings.remote_concurrency, len(starts))),
                                  thread_name_prefix="alignkit-remote-reward")
        try:
            parts = await asyncio.gather(*(self._request(loop, pool, start, {
                "prompts": prompts[start:start + size], "completions": completions[start:start + size],
                "columns": {k: list(v[start:start + size]) for k, v in columns.items()}}) for start in starts))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return [v for part in parts for v in part]

    async def _request(self, loop, pool, offset: int, payload: dict) -> list:
        s, body = self.settings, json.dumps(payload, default=_jsonable).encode()
        problem = ""
        for attempt in range(s.remote_retries + 1):
            if attempt:
                await asyncio.sleep(s.remote_backoff * 2 ** (attempt - 1))
            try:
                answer = await loop.run_in_executor(pool, self._post, body)
            except _Retry as e:
                problem = str(e)
                continue
            return self._rewards(answer, len(payload["completions"]), offset)
        raise RemoteRewardError(f"{self._where} {problem} ({s.remote_retries + 1} tries; see rewards.remote_timeout, "
                                "rewards.remote_retries)")

    @property
    def _where(self) -> str:
        return f"remote reward {self.url}"

    def _post(self, body: bytes) -> bytes:
        """One POST (in a worker thread): the answer's body; _Retry for what another try may mend."""
        p, timeout = self.parts, self.settings.remote_timeout
        connection = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = connection(p.hostname, p.port, timeout=timeout)
        try:
            conn.request("POST", (p.path or "/") + (f"?{p.query}" if p.query else ""), body=body,
                         headers={"Content-Type": "application/json", "Accept": "application/json"})
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            raise _Retry(f"did not answer within {timeout:g} s") from None
        except ConnectionRefusedError:
            raise _Retry("could not be reached: nothing listens there (connection refused)") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retry(f"broke the connection ({type(e).__name__}: {str(e) or 'no answer'})") from None
        finally:
            conn.close()
        if response.status == 429 or response.status >= 500:
            raise _Retry(f"answered HTTP {response.status} {_snippet(data)}")
        if response.status >= 300:
            raise RemoteRewardError(f"{self._where} answered HTTP {response.status} {_snippet(data)} (not retried)")
        return data

    def _rewards(self, data: bytes, n: int, offset: int) -> list:
        try:
            answer = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise RemoteRewardError(f"{self._where} answered something that is not JSON: {_snippet(data)}") from None
        values = answer.get("rewards") if isinstance(answer, dict) else answer
        if not isinstance(values, list):
            raise RemoteRewardError(f"{self._where} answered {_snippet(data)}; expected {{\"rewards\": [number or "
                                    "null, one per completion]}")
        if len(values) != n:
            raise RemoteRewardError(f"{self._where} answered {len(values)} rewards for {n} completions; answer one "
                                    "per completion (null where it does not apply)")
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RemoteRewardError(f"{self._where} answered {v!r} for completion {offset + i}; a reward is a "
                                        "number or null")
            if v is not None and not math.isfinite(v):
                raise RemoteRewardError(f"{self._where} answered {v} for completion {offset + i}; rewards must be "
                                        "finite (null where it does not apply)")
        return values


def _snippet(data: bytes) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())
    return repr(text[:80] + ("..." if len(text) > 80 else ""))

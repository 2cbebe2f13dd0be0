"""HTTP to a vLLM server, over TCP (http://host:port) or a Unix socket (unix:/path: the owned server's private one).

    generate(token_ids, sampling)  POST /inference/v1/generate   vLLM's token-in/token-out API (--enable-scale-out):
                                   token ids in; per sample token ids, the log-prob of each token and the weight
                                   version spans that sampled them out
    control(path, body)            the RL control plane of a dev-mode server (VLLM_SERVER_DEV_MODE=1):
                                   /init_weight_transfer_engine, /start_weight_update, /update_weights,
                                   /finish_weight_update, /weight_info, /pause, /resume
    healthy()                      GET /health

httpx, one pooled client per server (thread-safe: a rank's requests run concurrently on it), with a connect
timeout apart from the request's. Every call has a timeout; a refused connection, a timeout or an error status
raises VLLMError naming the server, the endpoint and what to change, never a hang. A generate request whose
connection failed is sent again (GENERATE_RETRIES times, backing off): requests are seeded or greedy, so a repeat
samples the same tokens. `describe_failure` (optional) is asked before each error message is built: an owned
server that died is reported with its exit code and last log lines instead of "connection refused".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx

GENERATE_RETRIES = 2  # a generate request whose connection failed is sent again this often (seeded: idempotent)
CONNECT_TIMEOUT_S = 10.0
UNIX_PREFIX = "unix:"  # unix:/abs/path/to/socket


def prometheus_total(text: str, name: str) -> float:
    """A counter of a vLLM server's /metrics (Prometheus text), summed over its label sets (engines)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{", 1)[0].split(" ", 1)[0] == name)


class VLLMError(RuntimeError):
    """A vLLM server failed a request, timed out, or is gone."""


class _ConnectionFailed(Exception):
    """The connection failed before an answer (refused, reset, closed): the request may be sent again."""


def _http_client(url: str, timeout_s: float) -> httpx.Client:
    timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    if url.startswith(UNIX_PREFIX):
        transport = httpx.HTTPTransport(uds=url[len(UNIX_PREFIX):], limits=limits)
        return httpx.Client(base_url="http://localhost", transport=transport, timeout=timeout)
    return httpx.Client(base_url=url, timeout=timeout, limits=limits, trust_env=False)  # no proxy for a server


class VLLMClient:
    def __init__(self, url: str, *, timeout_s: float, describe_failure: Callable[[], str | None] = lambda: None):
        """url: http://host:port or unix:/path; timeout_s: rollout.vllm.request_timeout_s (one request, generation
        included); describe_failure: why the server is gone, if it is (an owned server's exit code and log tail)."""
        self.url, self.timeout_s, self.describe_failure = url.rstrip("/"), timeout_s, describe_failure
        self.http = _http_client(self.url, timeout_s)

    def _request(self, method: str, path: str, body: dict | None, timeout: float, retries: int = 0) -> dict:
        """retries: how often a request whose CONNECTION failed (refused, reset, closed without an answer) is sent
        again, after 0.5 s, 1 s, ...; only for idempotent requests (generation: seeded or greedy)."""
        for attempt in range(retries + 1):
            try:
                return self._request_once(method, path, body, timeout)
            except _ConnectionFailed as exc:
                if attempt == retries:
                    raise VLLMError(f"vLLM server {self.url}{path} unreachable ({exc})"
                                    + (f" after {retries + 1} attempts" if retries else "") + self._gone()) from exc
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _request_once(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        try:
            response = self.http.request(method, path, json=body,
                                         timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout)))
        except httpx.ConnectTimeout as exc:
            raise _ConnectionFailed(f"connect timed out: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise self._timed_out(path, timeout) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _ConnectionFailed(str(exc) or type(exc).__name__) from exc
        if response.status_code >= 400:
            raise VLLMError(f"vLLM server {self.url}{path} answered {response.status_code}: {response.text[:500]}"
                            + (self._gone() if response.status_code >= 500 else ""))
        if not response.content:
            return {}
        try:
            return response.json()
        except json.JSONDecodeError:  # a plain-text answer (/v1/load_lora_adapter's "Success: ...")
            return {"text": response.text}

    def _timed_out(self, path: str, timeout: float) -> VLLMError:
        return VLLMError(f"vLLM server {self.url}{path} did not answer within {timeout:.0f} s: raise "
                         "rollout.vllm.request_timeout_s for long generations, or check the server's load"
                         + self._gone())

    def _gone(self) -> str:
        why = self.describe_failure()
        return f"; {why}" if why else ""

    def post(self, path: str, body: dict | None = None, *, timeout: float | None = None) -> dict:
        return self._request("POST", path, body if body is not None else {}, timeout or self.timeout_s)

    def get(self, path: str, *, timeout: float | None = None) -> dict:
        return self._request("GET", path, None, timeout or self.timeout_s)

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            return self.http.get("/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def generate(self, token_ids: list[int], sampling: dict, model: str | None = None,
                 cache_salt: str | None = None) -> list[dict]:
        """The choices of one request: [{"token_ids", "logprobs": {"content": [...]}, "weight_versions", ...}].
        model: a loaded LoRA adapter's name (None: the base model); cache_salt: the prefix cache is shared only
        among requests with the same salt."""
        body = {"token_ids": token_ids, "sampling_params": sampling, **({"model": model} if model else {}),
                **({"cache_salt": cache_salt} if cache_salt else {})}
        reply = self._request("POST", "/inference/v1/generate", body, self.timeout_s, retries=GENERATE_RETRIES)
        return reply["choices"]

    def weight_version(self) -> str:
        return str(self.get("/weight_info")["weight_version"])

    def close(self) -> None:
        self.http.close()

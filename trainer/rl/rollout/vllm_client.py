"""HTTP to a vLLM server (standard library only: the trainer's venv does not have vLLM).

    generate(token_ids, sampling)  POST /inference/v1/generate   vLLM's token-in/token-out API (--enable-scale-out):
                                   token ids in; per sample token ids, the log-prob of each token and the weight
                                   version spans that sampled them out
    control(path, body)            the RL control plane of a dev-mode server (VLLM_SERVER_DEV_MODE=1):
                                   /init_weight_transfer_engine, /start_weight_update, /update_weights,
                                   /finish_weight_update, /weight_info, /pause, /resume
    healthy()                      GET /health

Every call has a timeout; a refused connection, a timeout or an error status raises VLLMError naming the
server, the endpoint and what to change, never a hang. A generate request whose connection failed is sent again
(GENERATE_RETRIES times, backing off): requests are seeded or greedy, so a repeat samples the same tokens.
`describe_failure` (optional) is asked before each error message is built: an owned server that died is reported
with its exit code and last log lines instead of "connection refused".
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable


GENERATE_RETRIES = 2  # a generate request whose connection failed is sent again this often (seeded: idempotent)


class VLLMError(RuntimeError):
    """A vLLM server failed a request, timed out, or is gone."""


class _ConnectionFailed(Exception):
    """The connection failed before an answer (refused, reset, closed): the request may be sent again."""

    def __init__(self, reason):
        super().__init__(str(reason))
        self.reason = reason


class VLLMClient:
    def __init__(self, url: str, *, timeout_s: float, describe_failure: Callable[[], str | None] = lambda: None):
        """url: http://host:port; timeout_s: rollout.vllm.request_timeout_s (one request, generation included);
        describe_failure: why the server is gone, if it is (an owned server's exit code and log tail)."""
        self.url, self.timeout_s, self.describe_failure = url.rstrip("/"), timeout_s, describe_failure

    def _request(self, method: str, path: str, body: dict | None, timeout: float, retries: int = 0) -> dict:
        """retries: how often a request whose CONNECTION failed (refused, reset, closed without an answer) is sent
        again, after 0.5 s, 1 s, ...; only for idempotent requests (generation: seeded or greedy)."""
        for attempt in range(retries + 1):
            try:
                return self._request_once(method, path, body, timeout)
            except _ConnectionFailed as exc:
                if attempt == retries:
                    raise VLLMError(f"vLLM server {self.url}{path} unreachable ({exc.reason})"
                                    + (f" after {retries + 1} attempts" if retries else "") + self._gone()) from exc
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _request_once(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise VLLMError(f"vLLM server {self.url}{path} answered {exc.code}: {detail}"
                            + (self._gone() if exc.code >= 500 else "")) from None
        except (TimeoutError, socket.timeout) as exc:
            raise self._timed_out(path, timeout) from exc
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            if isinstance(getattr(exc, "reason", None), (TimeoutError, socket.timeout)):
                raise self._timed_out(path, timeout) from exc
            raise _ConnectionFailed(getattr(exc, "reason", exc)) from exc
        if not text:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # a plain-text answer (/v1/load_lora_adapter's "Success: ...")
            return {"text": text.decode(errors="replace")}

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
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException):
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

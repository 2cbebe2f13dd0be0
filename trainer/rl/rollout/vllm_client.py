"""HTTP to a vLLM server (standard library only: the trainer's venv does not have vLLM).

    generate(token_ids, sampling)  POST /inference/v1/generate   vLLM's token-in/token-out API (--enable-scale-out):
                                   token ids in; per sample token ids, the log-prob of each token and the weight
                                   version spans that sampled them out
    control(path, body)            the RL control plane of a dev-mode server (VLLM_SERVER_DEV_MODE=1):
                                   /init_weight_transfer_engine, /start_weight_update, /update_weights,
                                   /finish_weight_update, /weight_info, /pause, /resume
    healthy()                      GET /health

Every call has a timeout; a refused connection, a timeout or an error status raises VLLMError naming the
server, the endpoint and what to change, never a hang. `alive` (optional) is asked before each error message
is built: an owned server that died is reported with its last log lines instead of "connection refused".
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable


class VLLMError(RuntimeError):
    """A vLLM server failed a request, timed out, or is gone."""


class VLLMClient:
    def __init__(self, url: str, *, timeout_s: float, describe_failure: Callable[[], str | None] = lambda: None):
        """url: http://host:port; timeout_s: rollout.vllm.request_timeout_s (one request, generation included);
        describe_failure: why the server is gone, if it is (an owned server's exit code and log tail)."""
        self.url, self.timeout_s, self.describe_failure = url.rstrip("/"), timeout_s, describe_failure

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
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
            raise VLLMError(f"vLLM server {self.url}{path} did not answer within {timeout:.0f} s: raise "
                            "rollout.vllm.request_timeout_s for long generations, or check the server's load"
                            + self._gone()) from exc
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            raise VLLMError(f"vLLM server {self.url}{path} unreachable ({getattr(exc, 'reason', exc)})"
                            + self._gone()) from exc
        if not text:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # a plain-text answer (/v1/load_lora_adapter's "Success: ...")
            return {"text": text.decode(errors="replace")}

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

    def generate(self, token_ids: list[int], sampling: dict, model: str | None = None) -> list[dict]:
        """The choices of one request: [{"token_ids", "logprobs": {"content": [...]}, "weight_versions", ...}].
        model: a loaded LoRA adapter's name (None: the base model)."""
        body = {"token_ids": token_ids, "sampling_params": sampling, **({"model": model} if model else {})}
        reply = self.post("/inference/v1/generate", body)
        return reply["choices"]

    def weight_version(self) -> str:
        return str(self.get("/weight_info")["weight_version"])

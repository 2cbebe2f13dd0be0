"""A vLLM server the trainer owns (DESIGN rule 14): started, watched, stopped; its failures are errors, not hangs.

    VLLMServer(spec).start()
      where it listens                a Unix socket in a private directory (mkdtemp: 0700, this user only), or with
                                      tcp=True (rollout.vllm.expose_control_plane) host:port; port free? no:
                                      ValueError naming rollout.vllm.port (before anything starts)
      <python> -m vllm.entrypoints.openai.api_server --model ... (its own venv: scripts/install_vllm.sh)
          own process group; PR_SET_PDEATHSIG: the server gets SIGTERM if the trainer process dies, even by SIGKILL
          stdout + stderr -> output_dir/vllm_server.log
      poll /health until healthy      exited first: VLLMStartupError with the cause read from the log (port taken,
                                      out of memory, bad model path) and the key to change, plus the log's tail
                                      past rollout.vllm.startup_timeout_s: stopped, VLLMStartupError
    .failure()                        None while running; else the exit code and the log's tail (the client puts it
                                      in every error once the server is gone)
    .stop()                           SIGTERM to the process group, SIGKILL after 20 s, the private directory
                                      removed; idempotent; also run at interpreter exit and on SIGTERM
                                      (install_termination_handler)

Security: the server runs in vLLM's dev mode (VLLM_SERVER_DEV_MODE=1: the weight-transfer endpoints), whose
control plane (/update_weights, /pause, /collective_rpc, /sleep, /init_weight_transfer_engine) has no
authentication; vLLM's --api-key guards only /v1/*. So by default it listens on nothing but a Unix socket in a
directory only this user can enter: other users of the host cannot connect (the kernel refuses them the path),
nor can other hosts. TCP (any interface, loopback included, where every local user can connect) only with
tcp=True, which the trainer sets for rollout.vllm.expose_control_plane=true.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.rl.rollout.vllm_client import UNIX_PREFIX, VLLMClient, VLLMError
from trainer.rl.rollout.weights.file_transport import BACKEND

REPO = Path(__file__).resolve().parents[3]
DEFAULT_VENV_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LOG_TAIL_LINES = 30

# (text in the server's log, what it means, the key to change)
KNOWN_FAILURES = (
    ("Address already in use", "the port is taken", "rollout.vllm.port"),
    ("No available memory for the cache blocks", "no memory left for the KV cache",
     "rollout.vllm.gpu_memory_utilization (the share of GPU memory; on CPU of host memory)"),
    ("is less than desired CPU memory utilization", "not enough free host memory for that share",
     "rollout.vllm.gpu_memory_utilization (on CPU: the share of host memory), or free memory"),
    ("out of memory", "out of memory", "rollout.vllm.gpu_memory_utilization or a smaller model"),
    ("OutOfMemory", "out of memory", "rollout.vllm.gpu_memory_utilization or a smaller model"),
    ("Cannot allocate memory", "out of host memory", "rollout.vllm.gpu_memory_utilization"),
    ("does not appear to have a file named config.json", "the model path has no config.json",
     "model.name (or rollout.vllm.model)"),
    ("Repository Not Found", "the model cannot be found", "model.name (or rollout.vllm.model)"),
    ("Repo id must be in the form", "the model is neither a local directory nor a hub id",
     "model.name (or rollout.vllm.model)"),
    ("couldn't connect to 'https://huggingface.co'", "the hub is unreachable for a model not on disk",
     "model.name (or rollout.vllm.model) to a local directory"),
    ("is not a local folder and is not a valid model identifier", "the model cannot be found",
     "model.name (or rollout.vllm.model)"),
    ("No such file or directory", "a path does not exist", "model.name (or rollout.vllm.model)"),
    ("Invalid weight transfer backend", f"the server lacks cptrain's weight-transfer plugin ({BACKEND})",
     "rerun scripts/install_vllm.sh (it installs vllm_plugin/ into the vLLM venv)"),
    ("ModuleNotFoundError: No module named 'vllm'", "that python has no vLLM",
     "rollout.vllm.python (run scripts/install_vllm.sh)"),
)


class VLLMStartupError(RuntimeError):
    """The owned server did not become healthy."""


@dataclass
class ServerSpec:
    model: str
    python: str
    log_file: str
    tcp: bool = False  # False: a Unix socket in a private directory (host, port unused); True: host:port
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.15
    max_model_len: int = 2048
    enforce_eager: bool = True
    startup_timeout_s: float = 600.0
    seed: int = 0
    cpu: bool = False  # a server without CUDA devices
    lora_rank: int | None = None  # LoRA adapters sent after every step (rollout.vllm.lora_sync=adapter)
    max_loras: int = 2  # adapters loaded at once: the versions rollouts in flight may still use
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def command(self, socket_path: str | None = None) -> list[str]:
        """socket_path: where a private server listens (tcp=False)."""
        listen = ["--uds", socket_path] if socket_path else ["--host", self.host, "--port", str(self.port)]
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, *listen,
                "--dtype", self.dtype,
                "--gpu-memory-utilization", str(self.gpu_memory_utilization),
                "--max-model-len", str(self.max_model_len), "--seed", str(self.seed),
                "--logprobs-mode", "processed_logprobs",  # the log-prob of the distribution sampled: at T, top_p
                "--generation-config", "vllm",  # no sampling defaults from the model's generation_config.json
                "--enable-scale-out",  # /inference/v1/generate: token ids in and out, weight versions per token
                "--weight-transfer-config", '{"backend": "%s"}' % BACKEND]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.lora_rank is not None:
            args += ["--enable-lora", "--max-lora-rank", str(vllm_lora_rank(self.lora_rank)),
                     "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_loras)]
        if self.cpu:
            # vLLM 0.32 on CPU: a seeded request whose prefill is chunked kills the engine core ("CPU Generator
            # does not use offset"); whole prefills avoid it (a prompt + completion fits max_model_len)
            args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(self.max_model_len, 2048))]
        return args + list(self.extra_args)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


def vllm_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of this rank."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"model.lora.rank={rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}: use "
                         "rollout.vllm.lora_sync=merged")
    return fits[0]


def resolve_python(configured: str | None) -> str:
    """rollout.vllm.python, else $CPTRAIN_VLLM_PYTHON, else the venv scripts/install_vllm.sh builds."""
    python = configured or os.environ.get("CPTRAIN_VLLM_PYTHON") or str(DEFAULT_VENV_PYTHON)
    if not (Path(python).exists() or shutil.which(python)):
        raise ValueError(f"rollout.engine=vllm needs a python with vLLM: {python} does not exist. Build one with "
                         "scripts/install_vllm.sh (-> .venv-vllm), or set rollout.vllm.python (or CPTRAIN_VLLM_PYTHON)")
    return python


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"rollout.vllm.port={port} on {host} is taken ({exc.strerror}): choose another port, "
                             "or 0 for a free one") from None


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resolve_prctl():
    """libc's prctl, looked up once in the parent: dlopen in the forked child of a multi-threaded trainer may
    deadlock on a lock another thread held at the fork."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


_PRCTL = _resolve_prctl()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the trainer process dies (Linux PR_SET_PDEATHSIG), even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def read_log(path: str, offset: int = 0) -> str:
    """The log from byte `offset` (where this server's run began: the file is appended to across runs)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def diagnose(log_text: str) -> str:
    """The cause of a failed start: a known one with the key to change, else the first error line vLLM logged
    (the root cause; the traceback's last lines only say that the engine core failed)."""
    for needle, meaning, key in KNOWN_FAILURES:
        if needle in log_text:
            return f"{meaning}: change {key}"
    lines = [line.split("] ", 1)[-1].strip() for line in log_text.splitlines()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): .", line)]  # "ValueError: message"
    return f"first error: {errors[0][:400]}" if errors else "see the log"


_RUNNING: list["VLLMServer"] = []


def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


def install_termination_handler() -> None:
    """SIGTERM (torchrun stopping the job, a scheduler's preemption) raises SystemExit in the main thread, so
    `finally` blocks and atexit run and owned servers are stopped. An existing Python handler is kept."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


atexit.register(_stop_all)


class VLLMServer:
    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.process: subprocess.Popen | None = None
        self.url, self.log_offset = "", 0
        self.private_dir: str | None = None  # tcp=False: the 0700 directory holding the socket

    def start(self) -> "VLLMServer":
        spec = self.spec
        socket_path = None
        if spec.tcp:
            if spec.port:
                check_port_free(spec.host, spec.port)
            else:
                spec.port = free_port(spec.host)
            self.url = f"http://{spec.host}:{spec.port}"
        else:  # short path: a Unix socket's path is limited to 107 bytes
            self.private_dir = tempfile.mkdtemp(prefix="cptrain-vllm-")  # mode 0700
            socket_path = os.path.join(self.private_dir, "server.sock")
            self.url = UNIX_PREFIX + socket_path
        Path(spec.log_file).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **spec.env,
               "CPTRAIN_OWNER_PID": str(os.getpid())}  # the plugin's watchdog: the server dies with this process
        if spec.lora_rank is not None:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter, /v1/unload_lora_adapter
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"):
            env.pop(key, None)  # torchrun's variables describe the trainer's job, not the server's
        env.update(spec.env)
        with open(spec.log_file, "ab") as log:
            self.log_offset = log.tell()
            self.process = subprocess.Popen(spec.command(socket_path), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        _RUNNING.append(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        client, deadline = VLLMClient(self.url, timeout_s=5), time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = read_log(self.spec.log_file, self.log_offset)
                raise VLLMStartupError(f"the vLLM server exited with code {self.process.returncode} during startup "
                                       f"({diagnose(log)}); {self.spec.log_file} ends with:\n{self._tail(log)}")
            if client.healthy(timeout=2):
                return
            time.sleep(0.25)
        log = read_log(self.spec.log_file, self.log_offset)
        raise VLLMStartupError(f"the vLLM server was not healthy within rollout.vllm.startup_timeout_s="
                               f"{self.spec.startup_timeout_s:.0f} s (raise it for a large model; {diagnose(log)}); "
                               f"{self.spec.log_file} ends with:\n{self._tail(log)}")

    @staticmethod
    def _tail(log: str) -> str:
        return "\n".join(log.splitlines()[-LOG_TAIL_LINES:])

    def failure(self, settle_s: float = 0.0) -> str | None:
        """Why requests fail: the exit code and the log's tail if the server is gone; the first error it logged if
        it runs but logged one (a dead engine core answers 500); None otherwise. settle_s: a request that failed
        while the server was dying (its connection closed before the process was gone) waits up to this long for
        the exit, so the error names the exit code rather than a closed connection."""
        if self.process is None:
            return None
        if settle_s and self.process.poll() is None:
            try:
                self.process.wait(timeout=settle_s)
            except subprocess.TimeoutExpired:
                pass
        log = read_log(self.spec.log_file, self.log_offset)
        if self.process.poll() is None:
            return f"the vLLM server logged: {diagnose(log)}" if " ERROR " in log else None
        return (f"the owned vLLM server exited with code {self.process.returncode} ({diagnose(log)}); "
                f"{self.spec.log_file} ends with:\n{self._tail(log)}")

    def client(self, timeout_s: float) -> VLLMClient:
        return VLLMClient(self.url, timeout_s=timeout_s, describe_failure=lambda: self.failure(settle_s=5.0))

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's whole process group, SIGKILL to what is left after grace_s. The group, not the
        process: if the API server died first (killed, crashed), its engine-core children are still running."""
        process, self.process = self.process, None
        if self in _RUNNING:
            _RUNNING.remove(self)
        if process is not None:
            _stop_group(process, grace_s)
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None


def _stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the group, SIGKILL to what is left after grace_s, reaping the API server."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the API server: a zombie still counts as a member of the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    process.poll()


__all__ = ["ServerSpec", "VLLMServer", "VLLMStartupError", "VLLMError", "resolve_python",
           "install_termination_handler"]

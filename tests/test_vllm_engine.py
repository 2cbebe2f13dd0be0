"""rollout.engine=vllm against real vLLM servers (the vLLM venv of scripts/install_vllm.sh; skipped without it).

    shared server a tiny Llama (head dim 32: vLLM's CPU kernels) exported with the bundled tokenizer, started
                  once per session (tests/conftest.py: vllm_server) and used as an external server (rollout.vllm.urls)
    sync          cp=2 trainer (FSDP2 shards) -> several buckets through the weight-transfer protocol: vLLM's
                  greedy completions equal the trainer's plain copy at the same weights, its sampled log-probs
                  the trainer's CP forward within 1e-4 (fp32; different kernels), every token tagged with the version
    stale         a server whose weights carry another version: its rollouts are refused
    security      the owned server listens on a Unix socket in a 0700 directory, no TCP port; another user cannot
                  connect; the weight-transfer plugin reads only a private cptrain-weights-* directory's
                  .safetensors files, and a sync passes through exactly that
    failures      taken port, missing model, a python without vLLM: startup errors naming the key (the request
                  timeout: tests/test_rollout_engines.py, a loopback stand-in); an owned server killed mid-run: the
                  trainer's next request fails with its exit code and log lines, no process of its group left
    end to end    torchrun-style GRPO with an owned server; resume from a checkpoint reproduces the next step;
                  SIGTERM to the trainer stops its server
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed, run_with_own_group
from tests.test_rl import RL_FAST, compose_rl
from tests.vllm_support import SKIP, VLLM_FAST, group_alive, server_processes, server_spec
from trainer.rl.rollout.vllm_server import ServerSpec, VLLMServer, VLLMStartupError, resolve_python

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))


def _sync_worker(rank, world, url, model_dir, extra=()):
    """cp=2 trainer on the tiny Llama with perturbed weights (LoRA: base and adapters); sync to the server;
    compare with the trainer."""
    import torch.distributed as dist

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl import grpo
    from trainer.rl.training import grpo_backward, micro_batches
    from trainer.rl.prompts import make_prompts
    from trainer.rl.rollout.base import SamplingSettings, StaleRolloutError, check_versions
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine
    cfg = compose_rl(RL_FAST + VLLM_FAST + [f"model.name={model_dir}", f"rollout.vllm.urls=[{url}]", *extra])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():  # other weights than the server loaded: only a working sync makes them agree
        for p in trainer.model.parameters():
            local = p.to_local()
            local.add_(torch.randn(local.shape, generator=generator) * 0.05)
    engine = VLLMRolloutEngine(cfg.rollout.vllm, model_path=model_dir, tokenizer=trainer.tokenizer,
                               dtype=torch.float32, max_model_len=256, seed=0, log_dir=str(model_dir))
    stats = engine.sync(trainer.model, version=1)
    hf = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    hf.sync(trainer.model, version=1)
    prompts = [p.input_ids for p in make_prompts("add", 4, seed=rank, tokenizer=trainer.tokenizer)]
    greedy_equal = engine.greedy(prompts, max_new_tokens=12) == hf.greedy(prompts, max_new_tokens=12)
    groups = engine.sample(prompts, SamplingSettings(n=4, max_new_tokens=12, temperature=1.0, top_p=cfg.rollout.top_p,
                                                     seed=rank))
    completions = [c for g in groups for c in g]
    check_versions(completions, expected=1)
    rollouts = [grpo.Rollout(p, c.token_ids, c.logprobs, 0.0, advantage=0.0, version=c.version)
                for p, g in zip(prompts, groups) for c in g]
    parts = [None] * world
    dist.all_gather_object(parts, rollouts)
    mismatch = grpo_backward(cfg, trainer, micro_batches(cfg, trainer, [r for part in parts for r in part], 0))
    if rank == 0:  # another version on the server (as if another trainer synced it): refused
        engine.clients[0].post("/update_weight_version", {"new_version": "7"})
    dist.barrier()
    stale = None
    try:
        check_versions([c for g in engine.sample(prompts[:1], SamplingSettings(2, 4, 1.0, 1.0, 0)) for c in g], 1)
    except StaleRolloutError as exc:
        stale = str(exc)
    dist.barrier()
    if rank == 0:
        engine.clients[0].post("/update_weight_version", {"new_version": "1"})
    engine.close()
    dist.destroy_process_group()
    return {"stats": stats, "greedy_equal": greedy_equal, "versions": {c.version for c in completions},
            "mismatch": mismatch, "stale": stale, "tokens": sum(len(c.token_ids) for c in completions)}


@pytest.mark.parametrize("extra", [[], ["model.lora.rank=4", "rollout.vllm.lora_sync=merged"], ["rollout.top_p=0.8"]],
                         ids=["full", "lora_merged", "top_p"])
def test_synced_weights_sample_like_the_trainer(shared_vllm, extra):
    """LoRA merged: every adapted projection reaches vLLM as W + scale B A under its HF name (the adapter-only
    sync: tests/test_vllm_lora.py). top_p=0.8: vLLM reports the nucleus's log-probs (processed_logprobs) and the
    trainer computes the same nucleus's, so the mismatch stays at its top_p=1 size (it was ~0.2 nats)."""
    if extra:
        pytest.importorskip("peft")
    server, tiny_dir = shared_vllm
    results = run_distributed(_sync_worker, 2, server.url, str(tiny_dir), extra, timeout=600)
    first = results[0]
    assert first["stats"]["sync_buckets"] > 1, first["stats"]  # bucket by bucket, not the whole model at once
    assert first["stats"]["sync_bytes"] > 0
    assert all(r["greedy_equal"] for r in results), "vLLM's greedy completions differ from the trainer's"
    assert all(r["versions"] == {1} for r in results)
    m = first["mismatch"]
    # fp32, different kernels (vLLM's CPU attention vs the CP forward): ~1e-6 per token, 1e-4 at most
    assert m["train_tokens"] > 50
    assert m["logp_mismatch_abs_mean"] < 1e-5 and 1.0 <= m["logp_mismatch_ratio_max"] < 1 + 1e-4, m
    assert all(r["stale"] and "weight version(s) [7]" in r["stale"] for r in results), results


def _prefix_worker(rank, world, url, model_dir):
    """A 300-token prompt (two of vLLM's 128-token CPU blocks) sampled at weights v1, then again after a sync to v2:
    the second sample's log-probs against a plain forward at v2."""
    import torch.distributed as dist

    from tests.test_vllm_async import _perturb
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.rollout.base import SamplingSettings
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine
    cfg = compose_rl(RL_FAST + VLLM_FAST + ["model.cp=1", f"model.name={model_dir}", f"rollout.vllm.urls=[{url}]"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    engine = VLLMRolloutEngine(cfg.rollout.vllm, model_path=model_dir, tokenizer=trainer.tokenizer,
                               dtype=torch.float32, max_model_len=512, seed=0, log_dir=str(model_dir))
    prompt = torch.randint(3, len(trainer.tokenizer), (300,), generator=torch.Generator().manual_seed(5)).tolist()
    settings = SamplingSettings(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    worst = {}
    for version in (1, 2):
        _perturb(trainer, version)
        engine.sync(trainer.model, version=version)
        plain = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
        plain.sync(trainer.model, version=version)
        worst[version] = 0.0
        for c in engine.sample([prompt], settings)[0]:
            with torch.no_grad():
                logits = plain.model(input_ids=torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
            own = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            worst[version] = max(worst[version], float((own - torch.tensor(c.logprobs)).abs().max()))
    engine.close()
    dist.destroy_process_group()
    return worst


def test_a_prompt_seen_before_a_sync_is_not_continued_from_the_old_weights_kv(shared_vllm):
    """vLLM's weight update keeps the prefix cache: without a per-version cache salt the v2 sample of a prompt
    sampled at v1 read the v1 KV of its first 256 tokens (its log-probs were neither v1's nor v2's)."""
    server, model = shared_vllm
    worst = run_distributed(_prefix_worker, 1, server.url, str(model), timeout=600)[0]
    assert worst[1] < 1e-4 and worst[2] < 1e-4, worst  # fp32, different kernels


def _listening_tcp_inodes() -> set[str]:
    """The socket inodes of every listening TCP socket in this network namespace."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        inodes |= {row.split()[9] for row in rows if row.split()[3] == "0A"}  # st 0A: LISTEN
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    """The socket inodes a process holds open."""
    links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    return {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}


def _connect_as(uid: int, path: str) -> int:
    """errno of connecting to a Unix socket as another user (0: connected); forked, no exec."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to `uid`, try, report, exit without running any Python cleanup
        code = 255
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            code = 0
        except OSError as exc:
            code = exc.errno or 254
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    code = os.read(read, 1)[0]
    os.close(read)
    os.waitpid(pid, 0)
    return code


def test_the_owned_server_is_reachable_by_its_run_only(shared_vllm, tmp_path):
    """vLLM's dev-mode control plane has no authentication: the server listens on a Unix socket in a 0700
    directory and on no TCP port; another user is refused the path (root ignores modes: the test drops to uid
    65534); the weight-transfer plugin reads only a private run directory's .safetensors files, and while each
    bucket loads the run's sync directory is 0700 and holds that one .safetensors file, nothing else."""
    from safetensors.torch import load_file

    from trainer.rl.rollout.vllm_client import VLLMError
    from trainer.rl.rollout.weights.file_transport import FileWeightSender
    from trainer.rl.rollout.weights.run_dirs import private_run_dir

    server, model = shared_vllm
    path = server.url.removeprefix("unix:")
    assert server.url.startswith("unix:") and Path(path).exists()
    private = Path(path).parent.stat()
    assert private.st_mode & 0o777 == 0o700 and private.st_uid == os.getuid()
    # the HTTP API server (the control plane) listens on no TCP port (its engine core and worker hold loopback
    # ports of vLLM's own torch.distributed / gloo setup, which serve no HTTP)
    assert _socket_inodes(server.process.pid), "the server's sockets were not found"
    assert not _socket_inodes(server.process.pid) & _listening_tcp_inodes(), "the API server listens on TCP"
    if os.getuid() == 0:
        assert _connect_as(65534, path) == errno.EACCES  # another user: no connection, so no request at all
    client = server.client(timeout_s=60)
    assert client.healthy()  # this run's user
    shared = tmp_path / "cptrain-weights-shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(VLLMError, match="mode 0700"):
        client.post("/init_weight_transfer_engine", {"init_info": {"directory": str(shared)}})
    own = private_run_dir(str(tmp_path), "weights")
    client.post("/init_weight_transfer_engine", {"init_info": {"directory": str(own)}})
    (own / "bucket-0.bin").write_bytes(b"not a safetensors file")
    (tmp_path / "bucket-1.safetensors").write_bytes(b"outside")
    for file in (own / "bucket-0.bin", own / ".." / "bucket-1.safetensors"):
        client.post("/start_weight_update")  # (vLLM ends an update whose bucket failed)
        with pytest.raises(VLLMError, match="not a .safetensors file in the weight directory"):
            client.post("/update_weights", {"update_info": {"file": str(file)}})
    (own / "bucket-0.bin").unlink()
    seen = []

    class Watching:  # the directory as the server sees it at each bucket
        def post(self, path, body=None):
            if path == "/update_weights":
                directory = Path(body["update_info"]["file"]).parent
                seen.append((directory.stat().st_mode & 0o777, sorted(p.name for p in directory.iterdir())))
            return client.post(path, body)

    weights = load_file(str(model / "model.safetensors"))
    sender = FileWeightSender([Watching()], own)
    stats = sender.send(({name: tensor} for name, tensor in weights.items()), version=11)
    assert len(seen) == stats["sync_buckets"] == len(weights) > 1
    assert all(mode == 0o700 and names == [f"bucket-{i}.safetensors"] for i, (mode, names) in enumerate(seen)), seen
    assert client.weight_version() == "11" and not list(sender.directory.iterdir())


def _episodes_worker(rank, world, url, model_dir):
    """Three-turn episodes on the vLLM engine: token exactness (tests/test_episodes.py), the engine's log-prob of
    every sampled token against a plain forward over the whole trajectory (environment tokens included), and the
    servers' prefix-cache hit rate (an episode's turns on one server reuse its earlier turns' KV)."""
    import math

    import torch.distributed as dist

    from tests.test_episodes import Recorder, ThreeTurnEnv, _force_stop, _runner, _settings, assert_token_exact
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine
    cfg = compose_rl(RL_FAST + VLLM_FAST + ["model.cp=1", f"model.name={model_dir}", f"rollout.vllm.urls=[{url}]"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    engine = VLLMRolloutEngine(cfg.rollout.vllm, model_path=model_dir, tokenizer=trainer.tokenizer,
                               dtype=torch.float32, max_model_len=512, seed=0, log_dir=str(model_dir))
    engine.sync(trainer.model, version=0)
    engine.step_metrics()  # the counters so far
    recorder = Recorder(_force_stop(engine, 6))
    rows = [{"prompt": "Describe the weather. " * 12}, {"prompt": "Name three colours and say why. " * 9}]  # ~170 ids
    episodes = _runner(ThreeTurnEnv).run(recorder, rows, _settings(n=2), routes=[0, 1])
    assert_token_exact(episodes, recorder, n=2, turns=3, version=0)
    plain = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    plain.sync(trainer.model, version=0)
    worst = 0.0
    for e in episodes:
        ids = e.prompt_ids + e.ids
        with torch.no_grad():
            logits = plain.model(input_ids=torch.tensor([ids])).logits[0].float()  # [L, V]
        logp = torch.log_softmax(logits, -1)
        for i, (token, sampled, engine_logp) in enumerate(zip(e.ids, e.sampled, e.logprobs)):
            if sampled and not math.isnan(engine_logp):  # NaN: the test's forced stop token
                worst = max(worst, abs(float(logp[len(e.prompt_ids) + i - 1, token]) - engine_logp))
    hit_rate = engine.step_metrics().get("prefix_cache_hit_rate", 0.0)
    engine.close()
    dist.destroy_process_group()
    return worst, hit_rate


def test_multi_turn_episodes_on_vllm_are_token_exact_and_reuse_the_prefix_cache(shared_vllm):
    server, model = shared_vllm
    worst, hit_rate = run_distributed(_episodes_worker, 1, server.url, str(model), timeout=600)[0]
    assert worst < 1e-4, f"engine vs trainer log-prob on multi-turn trajectories: max abs diff {worst:.3g}"
    assert hit_rate > 0.3, f"prefix-cache hit rate {hit_rate:.2f}: later turns did not reuse earlier turns' KV"


def test_startup_failures_name_the_cause_and_the_key(tmp_path, vllm_server):
    tiny_dir = vllm_server[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match="rollout.vllm.port"):
            VLLMServer(server_spec(tiny_dir, tmp_path / "a.log", tcp=True, port=port)).start()
    start = time.monotonic()
    with pytest.raises(VLLMStartupError, match="model.name") as err:
        VLLMServer(server_spec(tmp_path / "no_such_model", tmp_path / "b.log")).start()
    assert time.monotonic() - start < 200 and "ends with" in str(err.value)
    with pytest.raises(VLLMStartupError, match="rollout.vllm.python"):
        VLLMServer(ServerSpec(model=str(tiny_dir), python=sys.executable, log_file=str(tmp_path / "c.log"),
                              startup_timeout_s=60)).start()
    with pytest.raises(ValueError, match="scripts/install_vllm.sh"):
        resolve_python(str(tmp_path / "missing" / "python"))


def _rl_worker(rank, overrides):
    from trainer.rl.loop import run_rl
    return run_rl(compose_rl(RL_FAST + VLLM_FAST + overrides))


def test_grpo_with_an_owned_server_runs_resumes_and_cleans_up(tmp_path):
    run_dir = tmp_path / "run"
    common = ["model.name=tiny:llama", "checkpoint.every=1", "checkpoint.keep_last=0", "rollout.eval_prompts=4"]
    history = run_with_own_group(_rl_worker, 2, common + [f"output_dir={run_dir}"], timeout=900)[0]
    assert [h["step"] for h in history] == [1, 2]
    assert not server_processes(str(run_dir)), "the owned server outlived the run"
    for h in history:
        assert h["sync_s"] >= 0 and h["generate_s"] > 0 and h["train_s"] > 0
        assert h["logp_mismatch_ratio_max"] < 1 + 1e-4, h  # fp32 engine vs trainer
    assert history[1]["sync_bytes"] > 0 and history[1]["sync_buckets"] > 1
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    # resume from the step-1 checkpoint in a copy: step 2 again, with a fresh server, the same numbers
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir, ignore=shutil.ignore_patterns("step_000002", "latest", "vllm_server.log"))
    again = run_with_own_group(_rl_worker, 2, common + [f"output_dir={resumed_dir}", "resume=true"], timeout=900)[0]
    assert [h["step"] for h in again] == [2]
    for key in ("reward_mean", "completion_len_mean", "entropy", "loss", "grad_norm", "train_tokens"):
        assert math.isclose(again[0][key], history[1][key], rel_tol=1e-6, abs_tol=1e-9), (key, again[0], history[1])

    def samples(path):  # the step-2 completions, as sampled by the server
        return [line for line in (path / "samples.jsonl").read_text().splitlines() if json.loads(line)["step"] == 2]
    assert samples(resumed_dir) == samples(run_dir)


def _trainer_subprocess(out_dir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """`torchrun -m trainer.rl` (one rank) with an owned server, max_steps high enough to be stopped by the test."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "trainer.rl",
           *RL_FAST, *VLLM_FAST, "model.cp=1", "model.name=tiny:llama", "max_steps=1000", f"output_dir={out_dir}",
           *overrides]
    with log.open("w") as sink:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _wait_for(condition, trainer: subprocess.Popen, what: str, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert trainer.poll() is None, f"the trainer exited before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def _wait_gone(out_dir: Path, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while server_processes(str(out_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not server_processes(str(out_dir))


def test_sigterm_to_the_trainer_stops_its_server(tmp_path):
    out_dir = tmp_path / "run"
    trainer = _trainer_subprocess(out_dir, tmp_path / "trainer.log")
    try:
        metrics = out_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), trainer, "first step")
        assert server_processes(str(out_dir)), "no server was running during the run"
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=120)
        assert _wait_gone(out_dir), "SIGTERM to the trainer left its vLLM server running"
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_sigkill_of_the_trainer_leaves_no_server_process(tmp_path):
    """SIGKILL (a preemption: no handler runs) of the trainer rank that owns the server: the server gets SIGTERM
    from the kernel (PR_SET_PDEATHSIG, set up with a prctl resolved before the fork) and takes its engine down."""
    out_dir = tmp_path / "run"
    trainer = _trainer_subprocess(out_dir, tmp_path / "trainer.log")
    try:
        metrics = out_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), trainer, "first step")
        api = [line.split()[0] for line in server_processes(str(out_dir)) if "api_server" in line]
        assert api, "no server was running during the run"
        owner = int(Path(f"/proc/{api[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the rank's pid
        os.kill(owner, signal.SIGKILL)
        assert _wait_gone(out_dir), "SIGKILL of the trainer left its vLLM server running"
        trainer.wait(timeout=60)
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_a_dead_server_stops_the_run_with_its_log_and_keeps_the_checkpoint(tmp_path):
    """The owned server dies mid-run (SIGKILL to its API server): the trainer's next request fails within the
    request timeout with the server's exit code and the tail of its log; the trainer exits non-zero; stop() leaves
    nothing of the server's process group (its engine core outlived the API server); the last checkpoint is
    complete (resume works from it: the resume test above)."""
    out_dir = tmp_path / "run"
    log = tmp_path / "trainer.log"
    trainer = _trainer_subprocess(out_dir, log, "checkpoint.every=1", "rollout.vllm.request_timeout_s=60")
    try:
        _wait_for(lambda: (out_dir / "checkpoints" / "latest").exists(), trainer, "first checkpoint")
        api = [line.split()[0] for line in server_processes(str(out_dir)) if "api_server" in line]
        assert api, "no server was running during the run"
        os.kill(int(api[0]), signal.SIGKILL)
        trainer.wait(timeout=300)
        output = log.read_text()
        assert trainer.returncode != 0
        assert "vLLM server exited with code -9" in output and "vllm_server.log ends with" in output, output[-3000:]
        assert _wait_gone(out_dir), "the dead server's engine processes outlived the run"
        assert not group_alive(int(api[0])), "a process of the server's group outlived stop()"
        latest = (out_dir / "checkpoints" / "latest").read_text().strip()
        assert (out_dir / "checkpoints" / latest / "complete.json").exists()
    finally:
        if trainer.poll() is None:
            trainer.kill()

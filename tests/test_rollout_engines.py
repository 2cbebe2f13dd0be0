"""The rollout engine interface (trainer/rl/rollout/base.py) and the hf engine's batched generation."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.tiny import tiny_model
from trainer.data.tokenizer import load_tokenizer
from trainer.rl.rollout.base import Completion, SamplingSettings, StaleRolloutError, check_versions, cut_at_end
from trainer.rl.rollout.hf import HFRolloutEngine, left_padded


def test_check_versions_refuses_other_weights():
    ok = [Completion([1, 2], [-0.1, -0.2], 3), Completion([4], [-0.3], 3)]
    check_versions(ok, expected=3)
    with pytest.raises(StaleRolloutError, match=r"1 of 3 rollouts were sampled with weight version\(s\) \[2\]"):
        check_versions(ok + [Completion([5], [-0.4], 2)], expected=3)


def test_cut_at_end_keeps_the_end_token():
    assert cut_at_end([5, 6, 2, 7, 2], 2) == [5, 6, 2]
    assert cut_at_end([5, 6], 2) == [5, 6]
    assert cut_at_end([5, 9, 6, 2], (2, 9)) == [5, 9]  # the first of several stop tokens


def test_both_engines_stop_at_the_end_of_turn_and_at_eos():
    """A tokenizer whose eos differs from its end-of-turn token: the hf engine's completion ends at the first
    eos it samples (it used to run on to the end of turn), and the vLLM engine asks its server for the same stop
    set and nothing else (ignore_eos: the server's own idea of eos is not consulted)."""
    from trainer.rl.rollout.base import end_of_turn_id, stop_token_ids
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine
    tokenizer = load_tokenizer("builtin")
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2)
    prompt = tokenizer.encode("What is 2 + 2?")
    engine = HFRolloutEngine(model, tokenizer, torch.device("cpu"))
    engine.sync(model, version=0)
    free = engine.greedy([prompt], max_new_tokens=12)[0]  # the end of turn only: eos is the same token here
    end = end_of_turn_id(tokenizer)
    cut = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] != end)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(free[cut])  # an eos that differs from <|im_end|>
    assert stop_token_ids(tokenizer) == (end, free[cut])
    engine = HFRolloutEngine(model, tokenizer, torch.device("cpu"))
    engine.sync(model, version=0)
    assert engine.greedy([prompt], max_new_tokens=12)[0] == free[:cut + 1]
    sampled = engine.sample([prompt], SamplingSettings(n=8, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0))
    assert all(t not in (end, free[cut]) for c in sampled[0] for t in c.token_ids[:-1])

    class Client:
        def generate(self, token_ids, sampling, model=None, cache_salt=None):
            self.sampling, self.salt = sampling, cache_salt
            return [{"index": 0, "token_ids": [7, free[cut], 9], "logprobs": {"content": [{"logprob": -1.0}] * 3},
                     "weight_versions": [{"start": 0, "end": 3, "version": "0"}]}]

    vllm = VLLMRolloutEngine.__new__(VLLMRolloutEngine)  # no server: the requests it would send
    vllm.stop_ids, vllm.clients, vllm.adapter, vllm.lora_rank = stop_token_ids(tokenizer), [Client()], None, None
    vllm.version, vllm.rank, vllm.pool, vllm.run, vllm.broken = 0, 0, ThreadPoolExecutor(1), "run1", None
    assert vllm.greedy([prompt], max_new_tokens=12) == [[7, free[cut]]]
    assert vllm.clients[0].sampling["stop_token_ids"] == [end, free[cut]] and vllm.clients[0].sampling["ignore_eos"]
    assert vllm.clients[0].salt == "cptrain-run1-v0"  # prefixes shared only among requests of the same weights
    vllm.sample([prompt], SamplingSettings(n=1, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0))
    assert vllm.clients[0].sampling["stop_token_ids"] == [end, free[cut]] and vllm.clients[0].sampling["ignore_eos"]


def test_left_padding_right_aligns_prompts():
    ids, mask = left_padded([[7, 8, 9], [5]], pad_id=0, device="cpu")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_one_batched_generate_equals_each_prompt_alone(family):
    """A rank's prompts of different lengths go to generate in ONE left-padded batch (pad tokens masked,
    positions from each row's first real token; Qwen3.5's DeltaNet and conv see zeros for the pads): every
    prompt's greedy completion equals the one it gets alone, and the sampled tokens' log-probs equal a
    teacher-forced forward of the prompt alone (fp32: only the padded batch's summation order differs)."""
    tokenizer = load_tokenizer("builtin")
    model = tiny_model(family, vocab_size=len(tokenizer), hidden_size=64, num_layers=2)
    engine = HFRolloutEngine(model, tokenizer, torch.device("cpu"))
    engine.sync(model, version=0)
    prompts = [tokenizer.encode(t) for t in ("What is 2 + 2?", "Sort the letters of the word banana please.",
                                             "Hi")]
    assert len({len(p) for p in prompts}) == 3
    batched = engine.greedy(prompts, max_new_tokens=10)
    alone = [engine.greedy([p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    groups = engine.sample(prompts, SamplingSettings(n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3))
    assert [len(g) for g in groups] == [2, 2, 2] and all(c.version == 0 for g in groups for c in g)
    worst = 0.0
    for prompt, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # [T, V]
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            worst = max(worst, (logp - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 1e-4, f"batched sampling log-probs vs the prompt alone: max abs diff {worst:.3g}"


def _choice(tokens, spans):
    return {"token_ids": tokens, "logprobs": {"content": [{"logprob": -0.5} for _ in tokens]},
            "weight_versions": [{"start": a, "end": b, "version": v} for a, b, v in spans]}


def test_vllm_completions_take_their_versions_from_spans_over_every_token():
    """The version of a vLLM completion is the one its spans name (the oldest; the newest when weights changed
    mid-completion); a token no span attributes is an error, never given the engine's current version."""
    from trainer.rl.rollout.vllm_client import VLLMError
    from trainer.rl.rollout.vllm_engine import _completion
    end = 2
    assert _completion(_choice([5, 6, 2, 9], [(0, 4, "3")]), end) == Completion([5, 6, 2], [-0.5] * 3, 3)
    switched = _completion(_choice([5, 6, 7, 2], [(0, 2, "3"), (2, 4, "4")]), end)
    assert (switched.version, switched.newest) == (3, 4)
    for spans in ([], [(0, 2, "3")], [(0, 1, "3"), (2, 4, "3")], [(0, 4, "default")]):  # none, short, a gap, unsynced
        with pytest.raises(VLLMError, match="attributed"):
            _completion(_choice([5, 6, 7, 2], spans), end)
    assert _completion(_choice([5, 6], []), end, adapter_version=7).version == 7  # LoRA: the adapter's version


def _loopback_server(handler):
    """A stand-in HTTP server on 127.0.0.1 (a free port) serving in a daemon thread; call .shutdown() after."""
    import http.server
    import threading
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_generate_request_whose_connection_fails_is_retried_then_named():
    """A loopback server that closes the first connections without an answer: the seeded request is sent again
    (the same tokens: idempotent) and succeeds; a server that never answers fails with the attempts counted."""
    import http.server
    import json

    from trainer.rl.rollout.vllm_client import GENERATE_RETRIES, VLLMClient, VLLMError

    class Flaky(http.server.BaseHTTPRequestHandler):
        drops, seen = 0, []

        def do_POST(self):
            Flaky.seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            if len(Flaky.seen) <= Flaky.drops:
                self.close_connection = True  # no status line: the client sees the connection closed
                return
            reply = json.dumps({"choices": [{"token_ids": [4]}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = _loopback_server(Flaky)
    try:
        client = VLLMClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=10)
        Flaky.drops = 1
        assert client.generate([5, 6], {"seed": 3}) == [{"token_ids": [4]}]
        assert len(Flaky.seen) == 2 and Flaky.seen[0] == Flaky.seen[1]  # the same seeded request, sent again
        Flaky.drops, Flaky.seen = 99, []
        with pytest.raises(VLLMError, match=f"unreachable .*after {GENERATE_RETRIES + 1} attempts"):
            client.generate([5, 6], {"seed": 3})
        assert len(Flaky.seen) == GENERATE_RETRIES + 1
    finally:
        server.shutdown()


def test_a_failed_sync_never_resumes_generation_on_partial_weights(tmp_path, monkeypatch):
    """A bucket that fails to load in an in-flight sync: the servers stay paused (no /resume on half-reloaded
    weights) and the engine refuses to sample afterwards, naming the failed sync."""
    from trainer.rl.rollout import vllm_engine
    from trainer.rl.rollout.vllm_client import VLLMError
    from trainer.rl.rollout.weights.file_transport import FileWeightSender

    class Client:
        def __init__(self):
            self.posted = []

        def post(self, path, body=None):
            self.posted.append(path)
            if path == "/update_weights" and self.posted.count(path) == 2:
                raise VLLMError("bucket 1 failed to load")
            return {}

    client = Client()
    sender = FileWeightSender([client], str(tmp_path))
    buckets = iter([{"a": torch.ones(2)}, {"b": torch.ones(2)}, {"c": torch.ones(2)}])
    with pytest.raises(VLLMError, match="bucket 1"):
        sender.send(buckets, version=3, pause=True)
    assert client.posted[:3] == ["/init_weight_transfer_engine", "/pause?mode=keep", "/start_weight_update"]
    assert "/resume" not in client.posted and "/finish_weight_update" not in client.posted

    def failing_sync(*args, **kwargs):
        raise RuntimeError("weight sync to vLLM failed: bucket 1 failed to load")

    monkeypatch.setattr(vllm_engine, "sync_policy", failing_sync)
    engine = vllm_engine.VLLMRolloutEngine.__new__(vllm_engine.VLLMRolloutEngine)
    engine.lora_rank, engine.sender, engine.server, engine.broken, engine.group = None, sender, None, None, None
    engine.adapter_sender, engine.sync_dir, engine.clients = None, None, []
    engine.stop_ids, engine.rank = (2,), 0
    engine.vcfg, engine.dtype, engine.version = type("V", (), {"sync_bucket_mb": 1.0})(), torch.float32, 2
    with pytest.raises(RuntimeError, match="bucket 1"):
        engine.sync(torch.nn.Linear(2, 2), version=3, in_flight=True)
    with pytest.raises(VLLMError, match="unusable after a failed weight sync.*bucket 1"):
        engine.sample([[5, 6]], SamplingSettings(n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0))


def test_a_sync_directory_too_small_is_refused_and_dead_runs_directories_are_removed(tmp_path):
    """The sync directory's free space is checked against one bucket at startup, naming the keys; the directories
    of runs that died without cleaning up (SIGKILL) are removed by the next run, a live run's are kept; the run's
    own directory is private (0700)."""
    import subprocess
    import sys

    from trainer.rl.rollout import vllm_engine
    from trainer.rl.rollout.weights.run_dirs import private_run_dir, process_identity

    engine = vllm_engine.VLLMRolloutEngine.__new__(vllm_engine.VLLMRolloutEngine)
    engine.vcfg = type("V", (), {"sync_dir": str(tmp_path), "sync_bucket_mb": 2.0**42})()
    with pytest.raises(ValueError, match="rollout.vllm.sync_dir=.*rollout.vllm.sync_bucket_mb"):
        engine._open_transports()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = process_identity(dead.pid)  # read while it runs (or exits: then None, which also stays dead)
    dead.wait()
    stale = tmp_path / f"cptrain-weights-{identity or f'{dead.pid}-1'}-abc"
    live = tmp_path / f"cptrain-weights-{process_identity(1)}-def"  # init: alive
    for directory in (stale, live):
        directory.mkdir()
        (directory / "bucket-0.safetensors").write_bytes(b"x")
    own = private_run_dir(str(tmp_path), "weights")
    assert not stale.exists() and live.exists() and own.stat().st_mode & 0o777 == 0o700


def test_the_owner_watchdog_kills_a_server_that_hangs_after_its_trainer_died(tmp_path):
    """vllm_plugin's owner watchdog (loaded into the API server): the trainer (here an intermediate process) dies by
    SIGKILL; a server that ignores SIGTERM and hangs (vLLM 0.32's uvicorn shutdown did) is killed with its process
    group after the grace period."""
    import subprocess
    import sys

    plugin = str(Path(__file__).resolve().parents[1] / "vllm_plugin")
    hanging_server = ("import os, signal, sys, time; sys.path.insert(0, %r); "
                      "import cptrain_vllm_plugin.owner_watch as w; w.GRACE_S, w.POLL_S = 0.5, 0.05; "
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); w.watch_owner(); "
                      "open(%r, 'w').write(str(os.getpid())); time.sleep(120)") % (plugin, str(tmp_path / "pid"))
    trainer = ("import os, subprocess, sys, time; "
               "env = {**os.environ, 'CPTRAIN_OWNER_PID': str(os.getpid())}; "
               "subprocess.Popen([sys.executable, '-c', %r], env=env, start_new_session=True); "
               "time.sleep(120)") % hanging_server
    owner = subprocess.Popen([sys.executable, "-c", trainer])
    deadline = time.monotonic() + 30
    while not (tmp_path / "pid").exists():
        assert time.monotonic() < deadline and owner.poll() is None, "the stand-in server did not start"
        time.sleep(0.05)
    server = int((tmp_path / "pid").read_text())
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server}").exists() and "Z" not in Path(f"/proc/{server}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the server outlived its trainer past the grace period"
        time.sleep(0.05)


def test_a_request_past_its_timeout_is_an_error_naming_the_key():
    """A server that answers after the request timeout (a loopback stand-in that holds the reply: deterministic,
    where a real server's generation time is not): the error names rollout.vllm.request_timeout_s, and a timed-out
    request is not sent again (only failed connections are)."""
    import http.server

    from trainer.rl.rollout.vllm_client import VLLMClient, VLLMError

    class Slow(http.server.BaseHTTPRequestHandler):
        seen = 0

        def do_POST(self):
            Slow.seen += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(1.0)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = _loopback_server(Slow)
    try:
        client = VLLMClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=0.2)
        with pytest.raises(VLLMError, match="did not answer within .*rollout.vllm.request_timeout_s"):
            client.generate([5, 6, 7], {"n": 8, "max_tokens": 400})
        assert Slow.seen == 1
    finally:
        server.shutdown()

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """(server, model directory): one plain vLLM server for the session (tests/vllm_support.py), started on first
    use. Its prefix cache is emptied before each test that takes it: no test reads KV another test's weights made."""
    from tests.vllm_support import SKIP, export_tiny_llama, server_spec
    from trainer.rl.rollout.vllm_server import VLLMServer
    if SKIP is not None:
        pytest.skip(SKIP)
    model = export_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    started = VLLMServer(server_spec(model, tmp_path_factory.mktemp("logs") / "server.log")).start()
    yield started, model
    started.stop()


@pytest.fixture
def shared_vllm(vllm_server):
    server, model = vllm_server
    server.client(timeout_s=30).post("/reset_prefix_cache")
    return server, model

"""cptrain's plugin for vLLM servers: the `cptrain_files` weight-transfer engine (see file_engine.py).

Installed into the vLLM venv (scripts/install_vllm.sh: pip install ./vllm_plugin); vLLM calls register() in
every process it starts (entry point group vllm.general_plugins). It imports nothing from cptrain: the two
sides share only the protocol (names and files), since they live in different environments. register() also starts
the owner watchdog in an owned server's API server (owner_watch.py: the server dies with its trainer).
"""

BACKEND = "cptrain_files"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from cptrain_vllm_plugin.owner_watch import watch_owner

    watch_owner()
    if BACKEND not in WeightTransferEngineFactory._registry:  # plugins may load more than once per process
        WeightTransferEngineFactory.register_engine(BACKEND, "cptrain_vllm_plugin.file_engine",
                                                    "FileWeightTransferEngine")

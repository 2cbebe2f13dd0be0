"""Weights from the FSDP2 policy to vLLM servers, one module per transport behind `sender.send(..., version)`.

    gather.py              the policy's shards gathered into buckets (full weights) or adapter tensors (LoRA)
    file_transport.py      full weights as safetensors files through vLLM's weight-transfer protocol
                           (the `cptrain_files` engine of vllm_plugin/)
    adapter_transport.py   LoRA adapters as peft directories through vLLM's runtime LoRA API
    sync.py                every rank gathers, rank 0 sends, every rank learns the outcome
    run_dirs.py            the run's private (0700) sync directory; dead runs' ones removed
"""

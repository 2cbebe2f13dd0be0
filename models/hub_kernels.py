"""HF hub attention kernels as CP inner kernels: model.attn="kernels-community/flash-attn2" style.

    model.attn = "<org>/<repo>[@revision][:function]"            (transformers' is_kernel pattern)
      └─ load_hub_kernel(attn)  at startup, through transformers' own loader:
           transformers.integrations.hub_kernels.load_and_register_attn_kernel(attn)
             downloads (or finds cached) the kernel with the `kernels` package and registers
             ALL_ATTENTION_FUNCTIONS[attn]; returns the kernel module
      └─ hub_local_kernel(attn, module)  the Ulysses local kernel, at call time:
           the module has flash_attn_varlen_func -> cp.cuda_kernels.FlashVarlenKernel on that module
                                                    (packed documents as THD + cu_seqlens, CUDA)
           otherwise                             -> the registered function through cp.hf_kernel
           sink layers (s_aux)                   -> cptrain's "lse" kernel (the sink needs the LSE)
    ring / hybrid: refused (a registered function returns no LSE to merge blocks with)

Startup errors name the cause: the `kernels` package missing, the kernel not loadable (offline, no
such repository or revision), no CUDA device for a flash kernel. The loaded modules are kept by
name (a process-wide registry next to transformers' own, filled once at startup).
"""

from __future__ import annotations

import re

import torch

_LOADED: dict[str, object] = {}  # model.attn -> the kernel module the loader returned


def is_hub_kernel(attn: str) -> bool:
    """True when `attn` names a hub kernel repository (the pattern transformers loads from the hub)."""
    from transformers.integrations.hub_kernels import is_kernel

    return is_kernel(attn)


def registered_suffix(attn: str) -> str:
    """A CP registration suffix for a hub kernel: no '/', ':' or 'flash' (transformers would treat the
    registered name as a hub repository or as its own flash-attn path)."""
    return "hub_" + re.sub("flash", "fl", re.sub(r"[^A-Za-z0-9]+", "_", attn), flags=re.IGNORECASE)


def load_hub_kernel(attn: str, cp_style: str) -> object:
    """Load and register hub kernel `attn` through transformers (once per process); refuse what cannot run."""
    from transformers.integrations import hub_kernels

    if attn not in _LOADED:
        try:
            module = hub_kernels.load_and_register_attn_kernel(attn)
        except ImportError as exc:
            raise ValueError(f"model.attn={attn} is an HF hub kernel, which needs the `kernels` package: pip install "
                             f"kernels ({exc}); or use model.attn=sdpa") from None
        except Exception as exc:
            raise ValueError(f"model.attn={attn}: transformers could not load the hub kernel (offline, or no such "
                             f"repository / revision / function?): {exc}. Use model.attn=sdpa, or cache the kernel "
                             "while online") from None
        if module is None:
            raise ValueError(f"model.attn={attn} is not a hub kernel name transformers can load (<org>/<repo>[:fn])")
        _LOADED[attn] = module
    module = _LOADED[attn]
    if hasattr(module, "flash_attn_varlen_func") and not torch.cuda.is_available():
        raise ValueError(f"model.attn={attn} is a flash-attention hub kernel and needs a CUDA device; on CPU use "
                         "model.attn=sdpa")
    if cp_style != "ulysses":
        raise ValueError(f"model.attn={attn} is a hub kernel registered as a plain attention function (no "
                         f"log-sum-exp); {cp_style} CP merges blocks by LSE: use model.cp_style=ulysses, or "
                         "model.attn=flash_attention_2 / sdpa")
    return module


def hub_local_kernel(attn: str, module: torch.nn.Module, q: torch.Tensor):
    """The Ulysses local kernel for loaded hub kernel `attn` (load_hub_kernel ran at startup); a flash
    kernel passes cptrain's exactness probe on q's device and dtype first (cp.kernel_check)."""
    from transformers import AttentionInterface

    import cp
    from cp import kernel_check
    from cp.cuda_kernels import FlashVarlenKernel, probe_local_kernel

    if attn not in _LOADED:
        raise ValueError(f"model.attn={attn} was not loaded: models.apply_cp loads hub kernels at startup")
    kernel_module = _LOADED[attn]
    if hasattr(kernel_module, "flash_attn_varlen_func"):
        kernel = FlashVarlenKernel(attn, source=kernel_module)
        kernel_check.require(f"{attn}_varlen", q.device, q.dtype, lambda: probe_local_kernel(kernel, q.device, q.dtype))
        return kernel
    return cp.hf_kernel(AttentionInterface._global_mapping[attn], module)

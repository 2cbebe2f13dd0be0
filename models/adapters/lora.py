"""LoRA adapters (peft) on a CP model: exact under every CP style, the frozen base in the compute dtype.

    build_model (fp32 HF model)
      -> apply_cp                 attention routed through CP, mixers wrapped (their projections keep HF names)
      -> apply_lora               peft.inject_adapter_in_model: every target nn.Linear becomes peft's lora.Linear,
                                  base_layer (frozen; cast to the compute dtype: no fp32 master of a weight that
                                  never changes) + lora_A [r, in], lora_B [out, r] (fp32 masters, trainable;
                                  B = 0 at the start: the model starts as the base)
      -> install_long_context     tiled MLP / checkpointing / chunked head call the adapted modules as modules
      -> FSDP2                    one unit per decoder layer holds its bf16 base and its fp32 adapters

Why exact under CP: an adapted projection is a per-token map, x W^T + (alpha / r) (x A^T) B^T, applied to the
tokens a rank holds, before or after the all-to-alls exactly as the base projection is. The CP code reads three
kinds of weights directly instead of calling the module (the mixers' depthwise conv1d for their halo, the LM
head in the chunked head, the embeddings' lookup): adapters there are refused (check_targets), never bypassed.

Names: peft keeps the base weight at `<proj>.base_layer.weight` and the adapter at `<proj>.lora_A.default.weight`.
hf_state_dict() gives HF's names back (merged: W + (alpha / r) B A, for vLLM's full-weight sync, refused below
fp32 where the rounding loses an early update, and checkpoint.export_merged); the hf rollout copy keeps the adapters
unmerged, as the trainer runs them (trainer/rl/rollout/hf.py rollout_copy); the adapter export is peft's own
save_pretrained on a plain model, so PeftModel.from_pretrained(base, dir) loads it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name; one adapter per model
LORA_KEY = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")


def require_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("model.lora.rank needs peft: pip install -e '.[lora]' (or pip install peft)") from exc
    return peft


@dataclass(frozen=True)
class LoraSpec:
    """What apply_lora installed (kept on the model as `cptrain_lora`)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, base_model: str | None = None):
        peft = require_peft()
        return peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=list(self.targets), bias="none", task_type="CAUSAL_LM",
                               base_model_name_or_path=base_model)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _matches(name: str, target: str) -> bool:
    """peft's rule for a string target: the module's full name or its last components."""
    return name == target or name.endswith("." + target)


def _is_router(parent: nn.Module) -> bool:
    """A linear map beside `experts` is an MoE router (or a shared-expert gate): its output picks experts."""
    return hasattr(parent, "experts")


def default_target_modules(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    """The last name of every nn.Linear inside the decoder layers (attention, MLP, mixer projections), read from
    the model itself; MoE routers are not adapted."""
    names = set()
    for layer in layers:
        for path, module in layer.named_modules():
            if isinstance(module, nn.Linear) and path:
                parent = layer.get_submodule(path.rpartition(".")[0]) if "." in path else layer
                if not _is_router(parent):
                    names.add(_leaf(path))
    names = {name for name in names if _peft_refuses(model, name) is None}  # Mamba models: out_proj (peft's rule)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear in its decoder layers to adapt: "
                         "name model.lora.target_modules")
    return sorted(names)


def _peft_refuses(model: nn.Module, target: str) -> str | None:
    """peft's own refusal of a target on this model type (Mamba models: out_proj, conv1d), if any."""
    from peft.tuners import tuners_utils
    check = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    if check is None:
        return None
    try:
        check(require_peft().LoraConfig(target_modules=[target]), model, target)
    except ValueError as exc:
        return str(exc)
    return None


def peft_export_problem(model: nn.Module, spec: LoraSpec) -> str | None:
    """Why PeftModel.from_pretrained(base, adapter_dir) would not load these adapters as trained (None: it would):
    peft refuses a target on this model type, or rewrites the targets (transformers-v5 MoE models: gate_proj /
    up_proj / down_proj become parameters of the fused experts)."""
    for target in spec.targets:
        if why := _peft_refuses(model, target):
            return why
    try:
        from peft.utils.transformers_weight_conversion import (convert_peft_config_for_transformers,
                                                               get_model_conversion_mapping)
    except ImportError:  # a peft without the conversion: nothing is rewritten
        return None
    config = spec.peft_config()
    before = (set(config.target_modules), set(config.target_parameters or ()))
    convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    after = (set(config.target_modules), set(config.target_parameters or ()))
    if after != before:
        return (f"peft rewrites these targets for {model.config.model_type} (its transformers-v5 MoE conversion): "
                f"modules {sorted(before[0] - after[0])} become parameters {sorted(after[1] - before[1])}")
    return None


def check_targets(model: nn.Module, layers: list[nn.Module], targets: list[str]) -> None:
    """Every target must match at least one module, and every module it matches must be an nn.Linear inside a
    decoder layer (what CP calls as a module); anything else is refused with the names that exist."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    modules = [(name, m) for name, m in model.named_modules() if name]
    linear_leaves = sorted({_leaf(n) for n, m in modules if isinstance(m, nn.Linear) and id(m) in inside})
    for target in targets:
        hits = [(name, m) for name, m in modules if _matches(name, target)]
        if not hits:
            raise ValueError(f"model.lora.target_modules: {target!r} matches no module of {type(model).__name__}; "
                             f"its decoder layers' linear projections are {linear_leaves}")
        bad = [name for name, m in hits if not isinstance(m, nn.Linear) or id(m) not in inside]
        if bad:
            raise ValueError(f"model.lora.target_modules: {target!r} matches {bad[0]} ({type(dict(hits)[bad[0]]).__name__}"
                             "), which is not a linear projection inside a decoder layer. Under CP the mixers' "
                             "conv1d, the embeddings and the LM head are read as weights (halo, lookup, chunked "
                             f"head), so an adapter there would be bypassed: choose among {linear_leaves}")


def apply_lora(model: nn.Module, lcfg, layers: list[nn.Module], compute_dtype: torch.dtype) -> LoraSpec:
    """Install adapters in place (after apply_cp, whose mixer wrappers call every adapted projection as a module;
    before the long-context wrappers and FSDP2); returns the spec."""
    peft = require_peft()
    targets = list(lcfg.target_modules) if lcfg.target_modules else default_target_modules(model, layers)
    check_targets(model, layers, targets)
    spec = LoraSpec(rank=int(lcfg.rank), alpha=float(lcfg.alpha), dropout=float(lcfg.dropout), targets=tuple(targets))
    # Layer by layer, each under a holder without a model config: given a transformers-v5 model, peft rewrites
    # v4-style MoE target names (gate_proj/up_proj/down_proj) into parameters of the fused experts and drops the
    # dense MLPs' modules (measured on GLM-4-MoE: the dense layer and the shared experts went unadapted), and it
    # refuses out_proj on Mamba models because HF's CUDA fast path reads out_proj.weight; under CP the mixers run
    # in cptrain's wrappers, which call in_proj / out_proj as modules. So peft adapts exactly the nn.Linear modules
    # check_targets approved; the parameter names are the model's own.
    for layer in layers:
        if any(_matches(name, t) for name, _ in layer.named_modules() for t in targets):
            holder = nn.Module()
            holder.layer = layer
            peft.inject_adapter_in_model(spec.peft_config(), holder, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        trainable = LORA_KEY.search(name) is not None
        param.requires_grad_(trainable)
        if trainable:
            param.data = param.data.float()  # fp32 master: AdamW state in fp32
        elif param.is_floating_point():
            param.data = param.data.to(compute_dtype)  # frozen: held in the compute dtype only
    model.cptrain_lora = spec
    return spec


def lora_spec(model: nn.Module) -> LoraSpec | None:
    return getattr(model, "cptrain_lora", None)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model (adapters off) inside the block: GRPO's KL reference without a second model. A model
    without adapters is unchanged."""
    if lora_spec(model) is None:
        yield model
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    # peft's forward reads this flag; its enable_adapters() would also flip requires_grad, which FSDP2 has
    # already partitioned its parameters by: the flag alone switches the computation
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale B A ([out, in]), computed in fp32, returned in W's dtype."""
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def hf_state_dict(state: dict[str, torch.Tensor], spec: LoraSpec | None, *, merge: bool = True) -> dict:
    """A full state dict with peft's names -> HF's names: `<proj>.base_layer.*` -> `<proj>.*`, merged with its
    adapter (W + scale B A, computed in fp32, returned in W's dtype) unless merge=False; adapter keys dropped."""
    if spec is None:
        return state
    out = {}
    for key, value in state.items():
        if LORA_KEY.search(key):
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        module, _, leaf = key.partition(".base_layer.")
        if merge and leaf == "weight":
            value = merged_weight(value, state[f"{module}.lora_A.{ADAPTER}.weight"],
                                  state[f"{module}.lora_B.{ADAPTER}.weight"], spec.scale)
        out[f"{module}.{leaf}"] = value
    return out


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a state dict (`<proj>.lora_A.default.weight`, ...)."""
    return {key: value for key, value in state.items() if LORA_KEY.search(key)}

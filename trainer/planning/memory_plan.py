"""Memory planner: per-rank peak memory of a run, for each cp / cp_style / technique choice, before launching it.

    python -m trainer.plan [--trainer sft|rl] [--world-size 8] [--budget-gb 80] [--all-styles] <Hydra overrides>

    the run's config (configs/{sft,rl}.yaml + overrides, validated as the trainer does)
        model.name ──> the model CONFIG only (tiny:<family> built in; a hub id / local path: config.json,
                       no weights)
    per choice (cp in the divisors of the world size; model.cp_style, or with --all-styles each style the
    model allows; each technique set):
        weights      fp32 master shard (FSDP2 over all dp x cp ranks) + the gathered compute-dtype working set:
                     the root (embeddings, final norm, LM head: gathered for the whole step) and two decoder
                     layers (the one computing, the one prefetched)
        gradients    fp32 gradient shard + the root's gathered gradients (reduced after backward) + one
                     layer's gathered gradient in fp32 (its reduce-scatter)
        optimizer    AdamW: two fp32 moments of the shard
        LoRA         model.lora.rank: the base shard in model.dtype, frozen (no gradient, no moments); the
                     adapters' fp32 shard, gradients and moments (activations are simulated without the
                     adapters: each adds [tokens, rank] per adapted projection)
        rl only      the reference model's shard (loss.kl_coef > 0) and, with rollout.engine=hf, the rollout copy
                     (full model, model.dtype; rollout.engine=vllm holds none on the trainer ranks)
        activations  | one micro-batch's fwd + loss + bwd, simulated on the meta device with the trainer's
        attention    | own code (trainer/planning/memory_sim.py): the peak bytes above the step's start, split by what
        logits       | was live at the peak
    -> a table, the configured run's total, the smallest cp that fits --budget-gb with the configured
       techniques (and with all of them); a budget no cp can meet is an error naming what would fit.

Technique sets are cumulative, as in docs/benchmarks/memory: off, chunked (model.chunked_head), +tiled
(model.tiled_mlp), +ckpt (model.activation_checkpointing), +offload (model.activation_offload). One sequence of
data.seq_len tokens per row, data.micro_batch_size rows (data.max_tokens_per_rank: one row of budget x cp
tokens, the largest token-budget micro-batch), every token a loss token (the worst case). Not
counted: the allocator's caching / fragmentation, CUDA and NCCL workspaces: leave ~10% of the device.
Attention is simulated as the flash kernel (what torch's CPU / CUDA flash kernels and flash-attn keep).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

import cp
from trainer import config
from trainer.planning.memory_sim import fake_world, meta_model, simulate_step
from models.adapters.lora import check_targets, default_target_modules
from trainer.modeling import DTYPES, decoder_layers

GIB = 2 ** 30
_KEYS = ("chunked_head", "tiled_mlp", "activation_checkpointing", "activation_offload")
TECHNIQUES = {name: dict(zip(_KEYS, (i >= 1, i >= 2, i >= 3, i >= 4)))  # cumulative: each adds one technique
              for i, name in enumerate(("off", "chunked", "+tiled", "+ckpt", "+offload"))}
COLUMNS = ("weights", "gradients", "optimizer", "activations", "attention", "logits")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the model: total, the largest decoder layer, the root (everything else)."""

    total: int
    largest_layer: int
    root: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ParamCounts:
        total = sum(p.numel() for p in model.parameters())
        layers = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
        return cls(total, max(layers), total - sum(layers))


@dataclass(frozen=True)
class Choice:
    cp: int
    style: str
    ulysses: int | None
    technique: str

    @property
    def label(self) -> str:
        style = self.style if self.cp > 1 else "-"
        return f"{style}(u={self.ulysses})" if self.style == "hybrid" and self.cp > 1 else style


@dataclass(frozen=True)
class Estimate:
    choice: Choice
    weights: int
    gradients: int
    optimizer: int
    activations: int
    attention: int
    logits: int

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COLUMNS)


def lora_counts(model: torch.nn.Module, lcfg) -> ParamCounts | None:
    """The adapters model.lora would add (r x (in + out) per adapted nn.Linear), by the same split as ParamCounts;
    None without model.lora.rank. The targets are what apply_lora would pick (models/adapters/lora.py)."""
    if lcfg.rank is None:
        return None
    layers = decoder_layers(model)
    targets = list(lcfg.target_modules) if lcfg.target_modules else default_target_modules(model, layers)
    check_targets(model, layers, targets)

    def adapters(module: torch.nn.Module) -> int:
        return sum(lcfg.rank * (m.in_features + m.out_features) for name, m in module.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
    per_layer = [adapters(layer) for layer in layers]
    return ParamCounts(sum(per_layer), max(per_layer), 0)


def state_bytes(params: ParamCounts, *, world: int, compute_bytes: int, trainer: str = "sft",
                reference: bool = False, rollout_copy: bool = True,
                adapters: ParamCounts | None = None) -> dict[str, int]:
    """Weights, gradients and optimizer state per rank (bytes): FSDP2 over all `world` ranks, fp32 masters.
    rollout_copy: the hf engine's plain copy of the model on every rank (rl only). adapters (LoRA): the base is
    frozen in the compute dtype (no fp32 master, no gradient, no AdamW state), the adapters are fp32 masters with
    gradients and AdamW moments, and the KL reference is the base itself (no second model)."""
    shard = -(-params.total // world)
    working = compute_bytes * (params.root + 2 * params.largest_layer)  # gathered root + two layers
    if adapters is None:
        weights, trained, grad_layer = 4 * shard + working, shard, params.largest_layer
    else:
        trained = -(-adapters.total // world)
        weights = compute_bytes * shard + 4 * trained + working + compute_bytes * 2 * adapters.largest_layer
        grad_layer, reference = adapters.largest_layer, False
    if trainer == "rl":
        weights += (compute_bytes * params.total if rollout_copy else 0) + (4 * shard if reference else 0)
    root_grads = compute_bytes * params.root if adapters is None else 0
    gradients = 4 * trained + root_grads + 4 * grad_layer
    return {"weights": weights, "gradients": gradients, "optimizer": 8 * trained}


def model_config_of(cfg):
    """The HF config of model.name (no weights): tiny:<family> from models.tiny with the tokenizer's
    vocabulary, anything else AutoConfig.from_pretrained (a local directory or the hub cache)."""
    from trainer.data.tokenizer import TINY_MODEL_PREFIX, load_tokenizer, resolve_tokenizer_name

    name = cfg.model.name
    if name.startswith(TINY_MODEL_PREFIX):
        from models.tiny import tiny_config

        tokenizer = load_tokenizer(resolve_tokenizer_name(cfg.data.tokenizer, name))
        return tiny_config(name[len(TINY_MODEL_PREFIX):], vocab_size=len(tokenizer),
                           hidden_size=cfg.model.tiny_hidden_size, num_layers=cfg.model.tiny_layers)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name)


def _styles_for(mcfg, all_styles: bool) -> list[tuple[str, int | None]]:
    """(style, configured Ulysses degree for hybrid): model.cp_style, then (all_styles) every registered one."""
    names = [mcfg.cp_style] + ([name for name in cp.CP_STYLES if name != mcfg.cp_style] if all_styles else [])
    return [(name, mcfg.cp_ulysses if name == "hybrid" else None) for name in names]


def _degrees(style: str, cp_size: int, ulysses: int | None, kv_heads: int) -> int | None | bool:
    """The hybrid Ulysses degree to use at cp_size (the configured one if it divides cp, else the largest
    proper divisor the KV heads allow); None for other styles; False if the hybrid cannot split cp_size."""
    if style != "hybrid":
        return None
    if ulysses and cp_size % ulysses == 0 and 1 < ulysses < cp_size:
        return ulysses
    options = [u for u in range(2, cp_size) if cp_size % u == 0 and u <= kv_heads]
    return max(options) if options else False


def build_dims(model_config, world: int, choice: Choice, *, chunks: int, dtype,
               mixer_cp: str = "ulysses") -> tuple[cp.ParallelDims | None, str]:
    """(the built ParallelDims, "") if `choice` can run this model (models.apply_cp's own startup checks),
    else (None, why)."""
    import models

    try:
        dims = cp.ParallelDims(world_size=world, cp=choice.cp, cp_style=choice.style, cp_ulysses=choice.ulysses)
        dims.build()
        models.apply_cp(meta_model(model_config, dtype), dims, attn="sdpa", chunks=chunks, mixer_cp=mixer_cp)
    except (cp.CPConfigError, ValueError, NotImplementedError) as exc:
        return None, str(exc).splitlines()[0]
    return dims, ""


def plan(cfg, *, world: int, trainer: str = "sft", techniques=None, all_styles: bool = False,
         cp_sizes=None) -> tuple[list, list]:
    """(estimates, refusals) for every choice: cp in the divisors of `world` (or cp_sizes), model.cp_style (and
    with all_styles every registered style the model allows), each technique set (or `techniques`: names in
    TECHNIQUES)."""
    mcfg = cfg.model
    dtype = DTYPES[mcfg.dtype]
    model_config = model_config_of(cfg)
    model = meta_model(model_config, dtype)
    params = ParamCounts.of(model)
    state = state_bytes(params, world=world, compute_bytes=torch.finfo(dtype).bits // 8, trainer=trainer,
                        reference=trainer == "rl" and bool(cfg.loss.kl_coef),
                        rollout_copy=trainer == "rl" and cfg.rollout.engine == "hf",
                        adapters=lora_counts(model, mcfg.lora))
    kv_heads = getattr(model_config, "num_key_value_heads", None) or getattr(model_config, "num_attention_heads", 1)
    budget = cfg.data.max_tokens_per_rank
    estimates, refusals = [], []
    with fake_world(world):
        for cp_size in cp_sizes or [d for d in range(1, world + 1) if world % d == 0]:
            for style, ulysses in _styles_for(mcfg, all_styles):
                if cp_size == 1 and style != mcfg.cp_style:
                    continue  # cp=1 has no style: one row
                ulysses = _degrees(style, cp_size, ulysses, kv_heads)
                if ulysses is False:
                    continue
                probe = Choice(cp_size, style, ulysses, "")
                if budget and budget * cp_size < cfg.data.seq_len:
                    refusals.append((probe, f"data.max_tokens_per_rank={budget} x cp={cp_size} cannot hold a "
                                            f"data.seq_len={cfg.data.seq_len} document"))
                    continue
                dims, why = build_dims(model_config, world, probe, chunks=mcfg.ulysses_chunks, dtype=dtype,
                                       mixer_cp=mcfg.mixer_cp)
                if dims is None:
                    refusals.append((probe, why))
                    continue
                for name in techniques or TECHNIQUES:
                    keys = SimpleNamespace(**{**_model_keys(mcfg), **TECHNIQUES[name]})
                    # the largest micro-batch: fixed rows, or one row filling the budget on every rank of the group
                    seq_len, rows = ((budget * cp_size, 1) if budget else (cfg.data.seq_len, cfg.data.micro_batch_size))
                    step = simulate_step(model_config, dims, keys, seq_len=seq_len, rows=rows, dtype=dtype,
                                         trainer=trainer, top_p=cfg.rollout.top_p if trainer == "rl" else 1.0)
                    estimates.append(Estimate(replace(probe, technique=name), **state, activations=step.activations,
                                              attention=step.attention, logits=step.logits))
    return estimates, refusals


def _model_keys(mcfg) -> dict:
    return {key: getattr(mcfg, key) for key in ("head_chunk_tokens", "mlp_tile_tokens", "ulysses_chunks", "mixer_cp")}


def configured_technique(mcfg) -> str:
    """The technique set of the run's own model.* keys (the closest cumulative set)."""
    own = {key: bool(getattr(mcfg, key)) for key in TECHNIQUES["off"]}
    for name, keys in TECHNIQUES.items():
        if keys == own:
            return name
    return next(name for name, keys in reversed(TECHNIQUES.items()) if all(own[k] >= v for k, v in keys.items()))


def smallest_fitting(estimates: list[Estimate], budget: int, technique: str) -> Estimate | None:
    fits = [e for e in estimates if e.choice.technique == technique and e.total <= budget]
    return min(fits, key=lambda e: (e.choice.cp, e.total)) if fits else None


def render(cfg, estimates: list[Estimate], refusals, *, world: int, budget: int | None, trainer: str) -> str:
    mcfg = cfg.model
    own = configured_technique(mcfg)
    unit, size = ("GiB", GIB) if max(e.total for e in estimates) >= GIB else ("MiB", 2 ** 20)
    batch = (f"token budget {cfg.data.max_tokens_per_rank} per rank" if cfg.data.max_tokens_per_rank else
             f"{cfg.data.micro_batch_size} x {cfg.data.seq_len} tokens per micro-batch")
    lines = [f"memory plan: {mcfg.name}, {batch}, world {world}, model.dtype={mcfg.dtype}, trainer {trainer}; "
             f"{unit} per rank", "",
             "| cp | style | technique | " + " | ".join(COLUMNS) + " | total |" + (" fits |" if budget else ""),
             "|---|---|---|" + "---|" * (len(COLUMNS) + 1) + ("---|" if budget else "")]
    for e in estimates:
        mark = " *" if (e.choice.cp, e.choice.style, e.choice.technique) == (mcfg.cp, mcfg.cp_style, own) else ""
        cells = " | ".join(f"{getattr(e, name) / size:.2f}" for name in COLUMNS)
        fits = (" yes |" if e.total <= budget else " no |") if budget else ""
        lines.append(f"| {e.choice.cp} | {e.choice.label} | {e.choice.technique}{mark} | {cells} | "
                     f"{e.total / size:.2f} |{fits}")
    lines += [f"\n* the configured run (model.cp={mcfg.cp}, model.cp_style={mcfg.cp_style}, techniques: {own})"]
    for choice, why in refusals:
        lines.append(f"cp={choice.cp} {choice.label}: refused at startup ({why})")
    if budget:
        lines.append(f"smallest cp within {budget / GIB:.1f} GiB per rank, by technique set:")
        for name in dict.fromkeys(e.choice.technique for e in estimates):
            best = smallest_fitting(estimates, budget, name)
            found = (f"model.cp={best.choice.cp} model.cp_style={best.choice.style} ({best.total / GIB:.2f} GiB)"
                     if best else "none")
            lines.append(f"  {name}{' (configured)' if name == own else ''}: {found}")
    return "\n".join(lines)


class BudgetError(ValueError):
    pass


def check_budget(estimates: list[Estimate], budget: int, *, world: int) -> None:
    """No choice fits the budget: say what the least-memory choice needs and what would change it."""
    if budget <= 0:
        raise BudgetError(f"--budget-gb must be > 0; got {budget / GIB:g}")
    if any(e.total <= budget for e in estimates):
        return
    least = min(estimates, key=lambda e: e.total)
    raise BudgetError(
        f"no cp in the divisors of world size {world} fits {budget / GIB:.1f} GiB per rank: the least memory is "
        f"{least.total / GIB:.2f} GiB (cp={least.choice.cp}, {least.choice.label}, {least.choice.technique}; "
        f"weights + gradients + optimizer {sum(getattr(least, n) for n in COLUMNS[:3]) / GIB:.2f} GiB). "
        "Use more GPUs (--world-size), a shorter data.seq_len or a smaller data.micro_batch_size")


def compose_run_config(trainer: str, overrides: list[str], world: int):
    """The run's config as the trainer composes and validates it (errors name the config key)."""
    from hydra import compose, initialize_config_dir

    from trainer.engine import CONFIG_DIR

    config.register_configs()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose(config_name=trainer, overrides=overrides)
    validate = config.validate_sft if trainer == "sft" else config.validate_rl
    with config.cp_errors_in_config_terms():
        validate(cfg, world)
    return cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=("sft", "rl"), default="sft")
    parser.add_argument("--world-size", type=int, default=8, help="GPUs of the run (dp x cp)")
    parser.add_argument("--budget-gb", type=float, default=None, help="memory per GPU, GiB")
    parser.add_argument("--all-styles", action="store_true", help="every CP style the model allows, not only "
                        "model.cp_style (ring / hybrid simulate more ops: slower)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for torchrun -m trainer.<trainer>")
    args = parser.parse_args(argv)
    if args.budget_gb is not None and args.budget_gb <= 0:
        parser.error(f"--budget-gb must be > 0; got {args.budget_gb:g}")
    cfg = compose_run_config(args.trainer, args.overrides, args.world_size)
    estimates, refusals = plan(cfg, world=args.world_size, trainer=args.trainer, all_styles=args.all_styles)
    budget = int(args.budget_gb * GIB) if args.budget_gb else None
    print(render(cfg, estimates, refusals, world=args.world_size, budget=budget, trainer=args.trainer))
    if budget:
        try:
            check_budget(estimates, budget, world=args.world_size)
        except BudgetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()

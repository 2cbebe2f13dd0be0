"""The family sweep: every causal-LM family transformers ships, packed under CP, against each
document run alone through the untouched model.

    for each family (models.tiny.family_configs: tiny config, or the reason it cannot be built tiny)
        reference: the untouched model (transformers' eager attention), q/k weights sharpened,
                   each document alone -> logits, loss over all tokens, every parameter gradient
        for each column (ulysses, ring; state = ulysses with model.mixer_cp=state) on `world` gloo ranks:
            models.apply_cp(copy, dims, mixer_cp=)  ── ValueError ──> "refused" (its message is the reason)
            packed random documents crossing the shard boundary -> unshard logits, all-reduce
            loss and gradients ──> "exact" within tolerance and state_dict keys unchanged,
                                   else "wrong" / "error" (a failure)

Outcomes: exact | refused | not_tiny (cannot be built tiny: listed with the reason) | wrong | error.
Only exact, refused and not_tiny are acceptable (tests/test_family_sweep.py asserts it;
scripts/family_sweep.py writes docs/support_matrix.md from the same results).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import re
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import CONFIG_MAPPING

import cp
import models
from models.tiny.family_configs import WINDOW, NotTiny, causal_lm_families, tiny_family_model
from models.traits import WINDOW_FIELDS
from tests.reference import random_doc_lens

STYLES = ("ulysses", "ring", "state")  # the matrix's columns
ATTENTION_STYLES = ("ulysses", "ring")  # the model.cp_style columns (state: ulysses with state-passing mixers)
# column -> (model.cp_style, model.mixer_cp): "state" is Ulysses attention with state-passing mixers; any other
# column name is a registered style with Ulysses mixers (column())
COLUMNS = {"state": ("ulysses", "state")}


def column(name: str) -> tuple[str, str]:
    """(model.cp_style, model.mixer_cp) of a sweep column."""
    return COLUMNS.get(name, (name, "ulysses"))
OUTCOMES = ("exact", "refused", "not_tiny", "wrong", "error")
SEQ_LEN = 61  # not divisible by cp: the pad path runs too
# Sharpened q/k make attention logits O(10) so a dropped softcap or window shows (>1e-1). fp32
# through 2 layers, blocked vs one-shot softmax: ~1e-6 relative; a leaked or dropped key is >1e-2.
LOGITS_RTOL = 5e-5  # times max(1, max |reference logit|)
LOSS_RTOL = 2e-5
GRAD_RTOL = 5e-5  # times max(1, max |reference gradient|) of that parameter
QK_GAIN = 3.0  # q/k projections: unit variance per output times this
# q/k norm weights: q.k of two normed head vectors (16 dims) has std ~4 times this squared, so 1.5
# gives logits ~9 even where the family's scaling is 1 (Gemma4); 3 made them ~36-140, where fp32
# rounding alone (~1e-6 per logit, amplified by the sharp softmax) reached 1e-4 in gradients.
QK_NORM_GAIN = 1.5
_QK_WEIGHT = re.compile(r"(^|\.)(q_proj|k_proj|query|key|qkv_proj|q_b_proj|kv_b_proj|wq|wk|wqkv|Wqkv|W_pack|c_attn"
                        r"|query_key_value|qkv|q_a_proj|kv_a_proj_with_mqa|linear_q|linear_k)\.weight$")
_QK_NORM = re.compile(r"(^|\.)(q_norm|k_norm|q_layernorm|k_layernorm|query_norm|key_norm)\.weight$")


# Trait variants: "<family>+<trait>" = the family's tiny config with these fields on top (the default
# configs of some families leave a trait off; the sweep turns it on where the family declares it).
MANUAL_VARIANTS = {
    # RoPE frequencies that depend on the sequence length: refused
    "llama+dynamic_rope": ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                                     "max_position_embeddings": 16}),
    "phi3+longrope": ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                   "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                                   "original_max_position_embeddings": 16},
                               "original_max_position_embeddings": 16, "max_position_embeddings": 64}),
}


@functools.lru_cache(maxsize=None)
def window_variants() -> dict:
    """"<family>+window" for every family whose default config declares a window and leaves it off (the field is
    None, or use_sliding_window is False): the window set to WINDOW, smaller than the sweep's documents, so a
    dropped window changes the numbers. Qwen2-style configs window the layers from max_window_layers on: 1."""
    variants = {}
    for family in causal_lm_families():
        defaults = _default_config(family)
        if defaults is None:
            continue
        fields = [f for f in WINDOW_FIELDS if f in defaults]
        if not fields or not (any(defaults[f] is None for f in fields) or defaults.get("use_sliding_window") is False):
            continue
        variant = {f: WINDOW for f in fields}
        if "use_sliding_window" in defaults:
            variant["use_sliding_window"] = True
        if "max_window_layers" in defaults:
            variant.update(max_window_layers=1, layer_types=None)
        variants[f"{family}+window"] = (family, variant)
    return variants


# Mask-shaping switches a family's config declares and leaves off: "<family>+<name>" turns the field on with the
# first of its values the config class accepts (Gemma 1-3: a bool; Gemma4: "all" | "vision" | None).
MASK_SWITCHES = {"bidirectional": ("use_bidirectional_attention", (True, "all"))}


@functools.lru_cache(maxsize=None)
def switch_variants() -> dict:
    """"<family>+<name>" for every family whose default config declares a MASK_SWITCHES field and leaves it off
    (Gemma-style use_bidirectional_attention: HF's mask turns bidirectional, windows symmetric): whatever HF's
    mask becomes must be reproduced or refused, never dropped."""
    variants = {}
    for family in causal_lm_families():
        defaults = _default_config(family)
        for name, (field, values) in MASK_SWITCHES.items():
            if defaults is None or field not in defaults or defaults[field] not in (None, False):
                continue
            accepted = [v for v in values if _default_config(family, **{field: v}) is not None]
            if accepted:
                variants[f"{family}+{name}"] = (family, {field: accepted[0]})
    return variants


def _default_config(family: str, **fields) -> dict | None:
    """The family's default config as a dict (with `fields` set), None where it does not construct."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CONFIG_MAPPING[family](**fields).to_dict()
    except Exception:
        return None  # the family's own entry reports it as not buildable tiny
    finally:
        hf_logging.set_verbosity(verbosity)


def variants() -> dict:
    """Every trait variant the sweep builds: name -> (family, config fields on top of its tiny config)."""
    return {**window_variants(), **switch_variants(), **MANUAL_VARIANTS}


def family_model(name: str, *, seed: int = 0):
    """The tiny eager model of a family or a variants() entry (NotTiny with the reason when impossible)."""
    family, variant = variants().get(name, (name, {}))
    return tiny_family_model(family, attn="eager", seed=seed, **variant)


def sharpen_qk(model: torch.nn.Module, gain: float = QK_GAIN, norm_gain: float = QK_NORM_GAIN) -> None:
    """Scale q/k projections (and q/k norms) up so attention logits are large: unit-variance
    projections times `gain`; norm weights set to `norm_gain` (offset-style norms, init 0: norm_gain - 1)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _QK_WEIGHT.search(name) and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * gain / p.shape[1] ** 0.5)
            elif _QK_NORM.search(name):
                p.fill_(norm_gain if p.abs().mean() > 0.5 else norm_gain - 1.0)


def labels_for(ids: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Next-token labels inside each document, -100 at each document's last token."""
    labels = torch.full_like(ids, -100)
    start = 0
    for n in lens:
        labels[0, start:start + n - 1] = ids[0, start + 1:start + n]
        start += n
    return labels


def reference_run(model, ids, lens, labels):
    """Each document alone through the untouched model; the loss over all tokens; its gradients."""
    logits, start = [], 0
    for n in lens:
        logits.append(model(input_ids=ids[:, start:start + n], use_cache=False).logits.float())
        start += n
    logits = torch.cat(logits, dim=1)
    loss = F.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="sum") / (labels != -100).sum()
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                            for p in model.parameters()]


def cp_run(model, dims, ids, lens, labels):
    """Packed documents under CP: full logits, the global loss and every gradient (summed over ranks)."""
    batch = cp.setup_cp_params(ids, dims, labels=labels, seq_lens=[lens])
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params, use_cache=False)
    count = (batch.labels != -100).sum()
    dist.all_reduce(count, group=batch.params.cp_group)
    logits = out.logits.float()
    local = F.cross_entropy(logits[0], batch.labels[0], ignore_index=-100, reduction="sum") / count
    local.backward()
    loss = local.detach().clone()
    dist.all_reduce(loss, group=batch.params.cp_group)
    grads = []
    for p in model.parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=batch.params.cp_group)  # each rank holds its tokens' share
        grads.append(g)
    return cp.unshard(logits.detach(), batch.params), loss, grads


def compare(ref, got, names) -> list[str]:
    """Mismatches (empty: exact within the tolerances above)."""
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = ref, got
    problems = []
    err, scale = (logits - ref_logits).abs().max().item(), max(1.0, ref_logits.abs().max().item())
    if not err <= LOGITS_RTOL * scale:
        problems.append(f"logits max abs err {err:.3g} (max |logit| {scale:.3g})")
    if not abs(loss - ref_loss).item() <= LOSS_RTOL * max(1.0, abs(ref_loss.item())):
        problems.append(f"loss {loss.item():.7f} vs {ref_loss.item():.7f}")
    for name, g, r in zip(names, grads, ref_grads):
        err, scale = (g - r).abs().max().item(), max(1.0, r.abs().max().item())
        if not err <= GRAD_RTOL * scale:
            problems.append(f"grad {name} max abs err {err:.3g} (max |grad| {scale:.3g})")
    return problems


def default_attn(model) -> str:
    """The inner kernel a user of this family gets by default (its configured SDPA, else eager)."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def sweep_family(family: str, dims_by_style: dict, *, seq_len: int = SEQ_LEN, seed: int = 0) -> dict:
    """{"not_tiny": reason} or {style: (outcome, detail)} for one family (same on every rank)."""
    try:
        reference = family_model(family, seed=seed)
    except NotTiny as exc:
        return {"not_tiny": str(exc)}
    sharpen_qk(reference)
    copies = {style: copy.deepcopy(reference) for style in dims_by_style}
    lens = random_doc_lens(seq_len, random.Random(7), max_len=seq_len // 2)
    ids = torch.randint(0, reference.config.get_text_config().vocab_size, (1, seq_len),
                        generator=torch.Generator().manual_seed(1))
    labels = labels_for(ids, lens)
    try:
        ref = reference_run(reference, ids, lens, labels)
    except Exception as exc:
        return {"not_tiny": f"the untouched tiny model does not run a plain forward/backward: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    names = [n for n, _ in reference.named_parameters()]
    results = {}
    for style, dims in dims_by_style.items():
        model = copies[style]
        try:
            models.apply_cp(model, dims, attn=default_attn(model), mixer_cp=column(style)[1])
        except ValueError as exc:
            results[style] = ("refused", str(exc))
            continue
        if not _ranks_agree(f"{family} {style} ready", dims):  # a rank that failed alone would hang the others
            results[style] = ("error", "ranks disagree on the startup outcome (apply_cp raised on some ranks only)")
            continue
        try:
            got = cp_run(model, dims, ids, lens, labels)
        except Exception as exc:
            results[style] = ("error", f"{type(exc).__name__}: {str(exc)[:300]}\n{traceback.format_exc()[-1500:]}")
            _ranks_agree(f"{family} {style} failed", dims)  # raises (fresh processes) if the group is broken
            continue
        problems = compare(ref, got, names)
        if list(model.state_dict()) != list(reference.state_dict()):  # HF names stay HF names (DESIGN rule 10)
            problems.insert(0, "apply_cp changed state_dict keys")
        results[style] = ("wrong", "; ".join(problems[:6])) if problems else ("exact", f"docs={lens}")
    return results


def _ranks_agree(tag: str, dims) -> bool:
    tags = [None] * dims.world_size
    dist.all_gather_object(tags, tag)
    return len(set(tags)) == 1


def sweep_worker(rank: int, world: int, families: list[str], styles=STYLES, progress: str | None = None) -> dict:
    """run_distributed target: every family under every style; rank 0's results (ranks agree).
    progress: a file rank 0 appends one JSON line per finished family to (survives a hung collective)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    dims_by_style = {}
    for style in styles:
        dims = cp.ParallelDims(world_size=world, cp=world, cp_style=column(style)[0])
        dims.build()
        dims_by_style[style] = dims
    results = {}
    for family in families:
        results[family] = sweep_family(family, dims_by_style)
        if progress and rank == 0:
            with open(progress, "a") as f:
                f.write(json.dumps({family: results[family]}) + "\n")
    return results


def run_sweep(families: list[str], world: int = 2, *, timeout: float = 3600) -> dict:
    """The sweep over `families` on `world` gloo ranks. A family that hangs a collective (a rank
    failed alone) is recorded as an error and the sweep resumes after it in fresh processes."""
    from tests.dist import run_distributed

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        progress = os.path.join(tmp, "progress.jsonl")
        while len(results) < len(families):
            todo = [f for f in families if f not in results]
            try:
                results.update(run_distributed(sweep_worker, world, todo, STYLES, progress, timeout=timeout)[0])
            except Exception as exc:
                with open(progress) if os.path.exists(progress) else open(os.devnull) as f:
                    for line in f:
                        results.update(json.loads(line))
                stuck = next(f for f in families if f not in results)
                results[stuck] = {style: ("error", f"the run died or hung: {type(exc).__name__}: {str(exc)[:300]}")
                                  for style in STYLES}
    return {f: results[f] for f in families}


def matrix_outcomes(text: str) -> dict:
    """{family: (outcome per style) | "not_tiny"} read back from a rendered docs/support_matrix.md, so a
    test can hold the committed matrix to what the sweep finds now."""
    outcomes, section = {}, "families"
    for line in text.splitlines():
        if line.startswith("## Not built tiny"):
            section = "not_tiny"
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) < 2 or cells[0] in ("family", "outcome", *OUTCOMES) or set(cells[0]) <= {"-"}:
            continue
        if section == "not_tiny":
            outcomes[cells[0]] = "not_tiny"
        elif len(cells) == 1 + len(STYLES):
            outcomes[cells[0]] = tuple(c.split(":")[0].strip("* ") for c in cells[1:])
    return outcomes

"""LM-head log-probs and entropy in token chunks: the [tokens, vocab] logits never exist in full.

    install_chunked_head(model)            refuses (ChunkedHeadUnsupported) what it cannot reproduce exactly
    model(input_ids, position_ids, cp_params, token_stats=TokenStatsRequest(targets, temperature, entropy))
      └─ the CausalLM's own forward runs with lm_head standing in: it keeps lm_head's input
           hidden [B, S, H] and returns a [B, S, 1] marker, which must come back unchanged as .logits
           (or softcapped like final_logit_softcapping): any other transform of the logits raises
      └─ ChunkedTokenLogprobs(hidden, lm_head.weight, lm_head.bias, targets)   still inside the root forward
           only the loss tokens (targets != -100), C at a time:
             z = h_c W^T + b           [C, V] in the compute dtype, then fp32 (the unchunked `.float()`)
             y = softcap(z) / T        softcap(z) = c tanh(z / c) (Gemma2's final_logit_softcapping)
             top_p < 1: y = -inf outside the nucleus the engine sampled from (models/nucleus.py)
             logp_all = log_softmax(y) -> logp = logp_all[target],  entropy = -sum(exp(logp_all) logp_all)
           backward, per chunk, y recomputed (and truncated):
             dy = g (onehot(target) - softmax(y));  dz = dy / T * softcap'(z)   -> compute dtype
             dh_c = dz W   [C, H],   dW += dz^T h_c  (fp32 accumulator, cast to W's dtype once),  db += sum dz
      └─ TokenStats(logp [B, S] fp32, 0 where ignored;  entropy [B, S] fp32 detached, 0 where ignored, or None)

    SFT: token cross-entropy sum = -logp.sum();  GRPO: logp and entropy at temperature T.
    Peak: one chunk's [C, V] buffers (chunk_bytes_per_token), C = auto_chunk_tokens(V, dtype): a 256 MiB
    budget, at least 128 tokens; plus W's fp32 gradient accumulator. Independent of the number of tokens.

Why the model's own forward with lm_head standing in (not the backbone called directly): every family
keeps its own decoder call, its kwargs (cp_params, ...) and anything it does to the hidden states before
the head. What it does AFTER the head is checked, not assumed: install_chunked_head runs the forward once
with the decoder and lm_head standing in (no layer runs, no weight is read) and refuses the model unless
the returned logits are exactly lm_head's output, softcapped when the config has a softcap (SOFTCAP_FIELDS)
(Cohere's logit_scale, Granite's logits_scaling != 1, an output multiplier, a vocabulary slice, a second
head call: refused, reason given); every later call checks its marker the same way. At their tiny configs
(models/tiny/family_configs.py, transformers 5.24) every causal-LM family passes the probe but cohere, cohere2,
cohere2_moe (logit_scale) and rembert (its head is not fed the hidden size).

FSDP2 (tests/test_chunked_head.py test_fsdp2_equals_one_process_reference): all of it runs inside the root
CausalLM's forward, so the root's pre-forward hook has gathered lm_head.weight (the unsharded parameter),
and the root is not resharded after forward by default; FSDP2's pre-backward hook sits on the returned logp,
so a root sharded with reshard_after_forward=True has the weight gathered again before the chunked backward
(tested too). The gradient lands on the unsharded parameter like any other use of it (tied embeddings: both
uses add up) and the root's reduce-scatter takes it from there.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from cp.documents import IGNORE_INDEX
from models.nucleus import entropy_of, top_p_truncated

CHUNK_BUDGET_BYTES = 256 * 2**20  # one chunk's [C, V] buffers (auto_chunk_tokens)
MIN_CHUNK_TOKENS = 128  # a GEMM tile's worth of rows: smaller chunks only cost speed
_FP32_BUFFERS = 3  # live fp32 [C, V] buffers at the backward's peak: y, log_softmax(y) / softmax, tanh
_COMPUTE_BUFFERS = 2  # [C, V] in a compute dtype below fp32: the matmul's output and dz
_ORIGINAL_FORWARD = "_chunked_head_original_forward"  # instance attribute holding the model's own forward
_PROBE_TOKENS = 3
_PROBE_RTOL = 1e-5  # the probe's logits are fp32, O(4): a multiplier 1e-5 away from 1 already shows


class ChunkedHeadUnsupported(ValueError):
    """The model's logits are not (softcapped) lm_head(hidden): use the full-logits path."""


@dataclass
class TokenStatsRequest:
    """What model(..., token_stats=...) computes instead of logits.

    targets: [B, S] long, the label of each position (-100: none); temperature: T of softmax(logits / T);
    entropy: also return the entropy (detached); chunk_tokens: tokens per chunk (None: auto_chunk_tokens)."""

    targets: torch.Tensor
    temperature: float = 1.0
    entropy: bool = False
    chunk_tokens: int | None = None
    top_p: float = 1.0  # < 1: log-probs of the nucleus the engine sampled from (models/nucleus.py)


@dataclass
class TokenStats:
    """logp [B, S] fp32 (differentiable; 0 where the target is -100); entropy [B, S] fp32 detached (0 where
    the target is -100) or None."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- chunk size


def chunk_bytes_per_token(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one token of a chunk holds at the backward's peak (an upper estimate a memory planner can use):
    fp32 logits, probabilities / their gradient and tanh (softcap), plus, below fp32, the compute-dtype
    matmul output and logit gradient."""
    extra = 0 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size() * _COMPUTE_BUFFERS
    return vocab * (4 * _FP32_BUFFERS + extra)


def auto_chunk_tokens(vocab: int, dtype: torch.dtype = torch.float32, *, n_tokens: int | None = None,
                      budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Tokens per chunk: as many as fit `budget_bytes` (chunk_bytes_per_token), rounded down to a multiple
    of MIN_CHUNK_TOKENS and at least that; at most n_tokens (when given, and at least 1)."""
    fit = budget_bytes // chunk_bytes_per_token(vocab, dtype)
    chunk = max(MIN_CHUNK_TOKENS, fit // MIN_CHUNK_TOKENS * MIN_CHUNK_TOKENS)
    return chunk if n_tokens is None else max(1, min(chunk, n_tokens))


def _check_chunk_tokens(chunk_tokens: int | None) -> None:
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}: give a positive number of tokens per chunk, or None to "
                         "pick it from the vocabulary size and dtype (auto_chunk_tokens)")


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# ------------------------------------------------------------------------------------ one chunk's numbers


def _scaled_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                   temperature: float, keep_tanh: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = softcap(h W^T + b) / T in fp32 [C, V], and tanh(z / softcap) [C, V] when keep_tanh (backward).
    The op order is the unchunked path's (lm_head, softcap as HF writes it, .float(), / T)."""
    z = F.linear(h, weight, bias).float()  # [C, V]: compute dtype -> fp32 (the same tensor in fp32)
    if softcap is None:
        return (z if temperature == 1.0 else z.div_(temperature)), None
    t = z.div_(softcap).tanh_()
    y = t * softcap if keep_tanh else t.mul_(softcap)
    return (y if temperature == 1.0 else y.div_(temperature)), (t if keep_tanh else None)




def _chunk_logprobs(h, weight, bias, targets, softcap, temperature, top_p, want_entropy):
    """One chunk's (log-prob of each target [C], entropy [C] or None); its [C, V] buffers die on return."""
    y, _ = _scaled_logits(h, weight, bias, softcap, temperature)
    logp_all = F.log_softmax(top_p_truncated(y, targets, top_p), -1)  # [C, V]
    del y
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    return logp, (entropy_of(logp_all, top_p < 1) if want_entropy else None)


def _logit_grad(h, weight, bias, targets, grad, softcap, temperature, top_p) -> torch.Tensor:
    """d(sum_i grad_i logp_i) / dz for one chunk, [C, V] in the compute dtype (the unchunked backward's ops;
    truncated logits get none: softmax is 0 there)."""
    y, t = _scaled_logits(h, weight, bias, softcap, temperature, keep_tanh=softcap is not None)
    p = F.log_softmax(top_p_truncated(y, targets, top_p), -1).exp_()  # [C, V] softmax(y) over the nucleus
    del y
    dy = p.mul_(-grad[:, None]).scatter_add_(1, targets[:, None], grad[:, None])  # grad (onehot - p)
    if temperature != 1.0:
        dy.div_(temperature)
    if softcap is not None:  # back through z / c -> tanh -> * c
        dy.mul_(softcap).mul_(t.mul_(t).neg_().add_(1)).div_(softcap)
    return dy.to(weight.dtype)


@functools.cache
def _fp32_out_addmm(device: str, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(acc_fp32, a, b, out_dtype=float32, out=acc) works and is right for `dtype` inputs
    on `device` (CUDA): checked once on a small case against fp32, else the upcast fallback is used."""
    if not device.startswith("cuda"):
        return False
    try:
        a, b = (torch.randn(shape, device=device).to(dtype) for shape in ((64, 32), (32, 48)))
        acc = torch.ones(64, 48, device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


def _add_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """acc [V, H] fp32 += dz^T [V, C] @ h [C, H], accumulated in fp32 whatever the compute dtype."""
    if dz.dtype == acc.dtype:
        acc.addmm_(dz.t(), h)
    elif _fp32_out_addmm(str(dz.device), dz.dtype):
        torch.addmm(acc, dz.t(), h, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(dz.t().float(), h.float())


def _chunk_backward(h, weight, bias, targets, grad, softcap, temperature, top_p, rows, dh, dw, db) -> None:
    """One chunk's share of the gradients: dh[rows] = dz W, dw += dz^T h, db += sum dz (each when not None)."""
    dz = _logit_grad(h, weight, bias, targets, grad, softcap, temperature, top_p)  # [C, V]
    if dh is not None:
        dh.index_copy_(0, rows, dz @ weight)
    if dw is not None:
        _add_weight_grad(dw, dz, h)
    if db is not None:
        db += dz.float().sum(0)


# ------------------------------------------------------------------------------------- autograd function


def _autocast_off(device_type: str):
    """Autocast disabled on `device_type`; a no-op where autocast does not exist (meta: trainer.plan)."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()


class ChunkedTokenLogprobs(torch.autograd.Function):
    """(hidden [..., H], weight [V, H], bias [V] | None, targets [...]) -> (logp [...], entropy [...] | empty).
    See the module docstring; call it through chunked_token_logprobs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, temperature, top_p, chunk_tokens, want_entropy):
        flat_h = hidden.reshape(-1, hidden.shape[-1])  # [..., H] -> [N, H]
        keep = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # [M] the loss tokens' rows (a sync)
        kept = targets.reshape(-1).index_select(0, keep)  # [...] -> [N] -> [M]
        chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0], weight.dtype, n_tokens=len(keep))
        logp = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp) if want_entropy else logp.new_empty(0)
        with _autocast_off(hidden.device.type):
            for rows in _chunks(len(keep), chunk):
                logp_c, entropy_c = _chunk_logprobs(flat_h.index_select(0, keep[rows]), weight, bias, kept[rows],
                                                    softcap, temperature, top_p, want_entropy)
                logp.view(-1).index_copy_(0, keep[rows], logp_c)  # [...] -> [N]
                if want_entropy:
                    entropy.view(-1).index_copy_(0, keep[rows], entropy_c)  # [...] -> [N]
        ctx.save_for_backward(hidden, weight, bias, keep, kept)
        ctx.settings = (softcap, temperature, top_p, chunk)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, keep, kept = ctx.saved_tensors
        softcap, temperature, top_p, chunk = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        flat_h = hidden.reshape(-1, hidden.shape[-1])  # [..., H] -> [N, H]
        grad = grad_logp.reshape(-1).index_select(0, keep).float()  # [...] -> [N] -> [M]
        dh = torch.zeros_like(flat_h) if need_h else None  # [N, H]; rows of ignored targets stay 0
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with _autocast_off(hidden.device.type):
            for rows in _chunks(len(keep), chunk):
                h = flat_h.index_select(0, keep[rows])  # [C, H]
                _chunk_backward(h, weight, bias, kept[rows], grad[rows], softcap, temperature, top_p, keep[rows],
                                dh, dw, db)
        return (dh.view(hidden.shape) if need_h else None,  # [N, H] -> [..., H]
                dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
                None, None, None, None, None, None)


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                           entropy: bool = False, chunk_tokens: int | None = None, top_p: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(softcap(hidden W^T + b) / T)[target] per token, [tokens, vocab] never held in full.

    hidden [..., H] and weight [V, H] (same dtype: the compute dtype), targets [...] long (-100: ignored,
    log-prob 0, no gradient). Returns (logp [...] fp32, differentiable; entropy [...] fp32 detached, or None);
    the entropy is computed on loss tokens only (0 elsewhere). chunk_tokens: loss tokens per chunk
    (None: auto_chunk_tokens)."""
    _check_chunk_tokens(chunk_tokens)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if hidden.dtype != weight.dtype or hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} {hidden.dtype} does not match the head weight "
                         f"{tuple(weight.shape)} {weight.dtype} ([..., H] and [V, H], one dtype)")
    if targets.shape != hidden.shape[:-1] or targets.dtype != torch.long:
        raise ValueError(f"targets {tuple(targets.shape)} {targets.dtype} do not match the hidden states "
                         f"{tuple(hidden.shape)} (labels of the input's shape, long)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    logp, ent = ChunkedTokenLogprobs.apply(hidden, weight, bias, targets, softcap, float(temperature), float(top_p),
                                           chunk_tokens, entropy)
    return logp, (ent if entropy else None)


# --------------------------------------------------------------------------------------- model integration


# config fields of a final logit softcap c tanh(logits / c): Gemma2-4 and others, RecurrentGemma, xLSTM
# (install_chunked_head's probe checks that the forward really does this with the value found)
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def final_logit_softcap(model: nn.Module) -> float | None:
    """The family's final logit softcap (config.final_logit_softcapping and the like), or None."""
    for config in (model.config, model.config.get_text_config()):
        for field in SOFTCAP_FIELDS:
            cap = getattr(config, field, None)
            if cap:
                return float(cap)
    return None


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


@contextmanager
def _forward_replaced(module: nn.Module, forward):
    """module.forward is `forward` inside the block (module hooks still run); restored after."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class _HeadStandIn:
    """Stands in for lm_head.forward: keeps each input, returns stand_in(input) as the 'logits'."""

    def __init__(self, stand_in):
        self.stand_in, self.inputs, self.outputs = stand_in, [], []

    def __call__(self, hidden):
        self.inputs.append(hidden)
        self.outputs.append(self.stand_in(hidden))
        return self.outputs[-1]


def _marker(hidden: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [..., 1] fp32 values 1.5 .. 5.5: what lm_head 'returns' while its input is kept."""
    n = hidden[..., :1].numel()
    return torch.arange(n, device=hidden.device).remainder(5).add(1.5).view(*hidden.shape[:-1], 1)


def _logits_of(out):
    return getattr(out, "logits", None) if not isinstance(out, tuple) else out[0]


def _logits_problem(out, stand_in: _HeadStandIn, softcap: float | None) -> str | None:
    """Why the forward's returned logits are not (softcapped) lm_head's output, or None."""
    if len(stand_in.inputs) != 1:
        return f"the forward called lm_head {len(stand_in.inputs)} times (expected once)"
    logits, expected = _logits_of(out), _softcapped(stand_in.outputs[0], softcap)
    if not isinstance(logits, torch.Tensor) or logits.shape != expected.shape:
        return (f"the forward slices or reshapes lm_head's output (returned logits {getattr(logits, 'shape', None)}, "
                f"lm_head gave {tuple(expected.shape)})")
    if not torch.allclose(logits.float(), expected, rtol=_PROBE_RTOL, atol=_PROBE_RTOL):
        cap = "" if softcap is None else f" beyond final_logit_softcapping={softcap}"
        return f"the forward transforms lm_head's output{cap} (a logit scale or an output multiplier?)"
    return None


class _AnyOutput(dict):
    """The decoder's output during the install probe: last_hidden_state, anything else None."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __getitem__(self, key):
        return dict.get(self, "last_hidden_state" if key == 0 else key)


def _backbone(model: nn.Module) -> nn.Module | None:
    """The decoder the CausalLM's forward calls: get_decoder(), else .model (Llama4's get_decoder() misses it)."""
    decoder = model.get_decoder()
    decoder = getattr(model, "model", None) if decoder is model else decoder
    return decoder if isinstance(decoder, nn.Module) else None


def _structure_problem(model: nn.Module) -> str | None:
    """Why the head is not a plain nn.Linear the forward reaches through get_output_embeddings(), or None."""
    try:
        head, decoder = model.get_output_embeddings(), _backbone(model)
    except (AttributeError, NotImplementedError) as exc:
        return f"no output embedding / decoder to find ({type(exc).__name__}: {exc})"
    if type(head) is not nn.Linear:
        return (f"its output embedding is {type(head).__name__}, not a plain torch.nn.Linear (an FSDP unit "
                "of its own, PEFT, a custom head?)")
    if head._forward_hooks or head._forward_pre_hooks:
        return "lm_head has forward hooks: the chunked path would bypass them"
    if decoder is None:
        return "no decoder found (get_decoder() returns the model itself and it has no .model)"
    return None


def _probe_problem(model: nn.Module, forward) -> str | None:
    """Run the model's forward with the decoder and lm_head standing in (no layer runs): the returned logits
    must be lm_head's output, softcapped when the config says so."""
    head, decoder = model.get_output_embeddings(), _backbone(model)
    device = head.weight.device if head.weight.device.type != "meta" else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, _PROBE_TOKENS, head.in_features, generator=generator).to(device)
    logits = (torch.randn(1, _PROBE_TOKENS, head.out_features, generator=generator) * 4).to(device)
    stand_in = _HeadStandIn(lambda _h: logits)
    try:
        with torch.no_grad(), _forward_replaced(decoder, lambda *a, **k: _AnyOutput(last_hidden_state=hidden)), \
                _forward_replaced(head, stand_in):
            out = forward(input_ids=torch.zeros(1, _PROBE_TOKENS, dtype=torch.long, device=device), use_cache=False)
    except Exception as exc:  # noqa: BLE001 (any failure means: not verified, so not supported)
        return f"could not check what the forward does to lm_head's output ({type(exc).__name__}: {exc})"
    problem = _logits_problem(out, stand_in, final_logit_softcap(model))
    return None if problem is None else problem + _config_hint(model)


_SCALE_WORDS = ("logit", "multiplier", "scal")


def _config_hint(model: nn.Module) -> str:
    """Config fields that look like logit transforms, for the refusal message."""
    fields = {k: v for k, v in model.config.to_dict().items()
              if any(w in k for w in _SCALE_WORDS) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return f"; config fields that may do it: {fields}" if fields else ""


def supports_chunked_head(model: nn.Module) -> str | None:
    """None when install_chunked_head(model) reproduces model(...).logits exactly, else the reason."""
    forward = getattr(model, _ORIGINAL_FORWARD, None) or model.forward
    return _structure_problem(model) or _probe_problem(model, forward)


def has_chunked_head(model: nn.Module) -> bool:
    """True once install_chunked_head(model) ran (model(..., token_stats=) works)."""
    return getattr(model, _ORIGINAL_FORWARD, None) is not None


def install_chunked_head(model: nn.Module) -> nn.Module:
    """Give `model` (a CausalLM) the `token_stats=` keyword (in place; returns it); before or after apply_cp and
    fully_shard (the probe runs no layer and reads no weight). Idempotent. Raises ChunkedHeadUnsupported with
    the reason for a model whose logits it cannot reproduce."""
    if has_chunked_head(model):
        return model
    reason = supports_chunked_head(model)
    if reason is not None:
        raise ChunkedHeadUnsupported(
            f"{type(model).__name__}: chunked LM-head log-probs would not equal the model's logits: {reason}. "
            "Use the full-logits path (model(...).logits with trainer.loss.token_loss_sum / token_logprobs) "
            "for this model.")
    setattr(model, _ORIGINAL_FORWARD, model.forward)
    model.forward = MethodType(_forward_with_token_stats, model)
    return model


def _forward_with_token_stats(self, *args, token_stats: TokenStatsRequest | None = None, **kwargs):
    """The installed forward: the model's own without token_stats; with it, TokenStats (no logits)."""
    forward = getattr(self, _ORIGINAL_FORWARD)
    if token_stats is None:
        return forward(*args, **kwargs)
    if kwargs.get("labels") is not None:
        raise ValueError("token_stats= and labels= together: the loss comes from token_stats' log-probs")
    _check_chunk_tokens(token_stats.chunk_tokens)
    head, softcap = self.get_output_embeddings(), final_logit_softcap(self)
    stand_in = _HeadStandIn(_marker)
    with _forward_replaced(head, stand_in):
        out = forward(*args, **kwargs)
    problem = _logits_problem(out, stand_in, softcap)
    if problem is not None:
        raise ChunkedHeadUnsupported(f"{type(self).__name__} at run time: {problem}; use the full-logits path")
    if isinstance(head.weight, DTensor):
        raise ChunkedHeadUnsupported("lm_head.weight is still sharded (DTensor) inside the forward: shard the "
                                     "CausalLM as the FSDP root (trainer/modeling.py parallelize), not lm_head alone")
    logp, entropy = chunked_token_logprobs(stand_in.inputs[0], head.weight, token_stats.targets, bias=head.bias,
                                           temperature=token_stats.temperature, top_p=token_stats.top_p,
                                           softcap=softcap, entropy=token_stats.entropy,
                                           chunk_tokens=token_stats.chunk_tokens)
    return TokenStats(logp=logp, entropy=entropy)

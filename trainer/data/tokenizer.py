"""The trainers' tokenizer: which one, loading it, the pad id, and the startup check against the model.

    data.tokenizer, model.name
      ─ resolve_tokenizer_name ─> "builtin" (auto for tiny:* models) | model.name (auto) | data.tokenizer
      ─ load_tokenizer ─> the bundled byte-level BPE (trainer/data/assets/tokenizer, offline) | AutoTokenizer
      ─ check_tokenizer_fits_model(tok, model)   before any collective: ids < embedding rows, the bundled
                                                  tokenizer only next to a tiny:* model, eos, chat template
    pad_token_id(tok)    pad, else eos: what PackedLoader, pack_rollouts and setup_cp_params pad with
"""

from __future__ import annotations

from pathlib import Path

from trainer.data.chat import chat_template
from trainer.data.records import ASSETS_DIR

TINY_MODEL_PREFIX = "tiny:"  # trainer.modeling.TINY_PREFIX (not imported: data must not import the model stack)
BUILTIN_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def resolve_tokenizer_name(tokenizer: str | None, model_name: str) -> str:
    """data.tokenizer -> what load_tokenizer gets. "auto" (the default): the bundled tokenizer for a
    random-init tiny:* model (it has no tokenizer of its own), else the model's own (model.name, the
    same hub id or directory from_pretrained loads the weights from, with its chat template)."""
    if tokenizer in (None, "auto"):
        return "builtin" if model_name.startswith(TINY_MODEL_PREFIX) else model_name
    return tokenizer


def load_tokenizer(name_or_path: str | None = None):
    """None or "builtin": the bundled byte-level BPE tokenizer (offline); otherwise
    `AutoTokenizer.from_pretrained(name_or_path)` (an HF hub id or a local directory)."""
    from transformers import AutoTokenizer

    if name_or_path in (None, "builtin"):
        if not (BUILTIN_TOKENIZER_DIR / "tokenizer.json").is_file():
            raise FileNotFoundError(f"the bundled tokenizer is missing from {BUILTIN_TOKENIZER_DIR}: "
                                    "run `python scripts/make_assets.py` (or reinstall with the package data)")
        return AutoTokenizer.from_pretrained(str(BUILTIN_TOKENIZER_DIR))
    fix = "set data.tokenizer to the model's tokenizer (an HF id or a local directory with tokenizer files)"
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an EMPTY tokenizer of the config's model type here, without complaint
        raise ValueError(f"{name_or_path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {name_or_path!r} ({err}): {fix}") from err
    if len(tokenizer) < 2:
        raise ValueError(f"the tokenizer loaded from {name_or_path!r} is empty ({len(tokenizer)} tokens): {fix}")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the pad token, else the end-of-sequence token (a common convention: pad
    positions are their own document and never a loss target, so any in-range id is safe)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token: "
                     "set tokenizer.eos_token (the trainers end turns and stop generation at it)")


def check_tokenizer_fits_model(tokenizer, model, *, tokenizer_name: str, model_name: str) -> None:
    """Refuse, at startup, a tokenizer the model cannot use (DESIGN rule 11): an id past the input
    embedding table (it would index out of range or train rows that mean nothing), the bundled
    tokenizer next to a pretrained model (its ids are in range but meaningless), no eos token (SFT
    ends assistant turns with it, rollouts stop at it, padding falls back to it), no chat template."""
    rows = model.get_input_embeddings().num_embeddings
    size = max(max(tokenizer.get_vocab().values(), default=-1) + 1, len(tokenizer))
    own = "leave data.tokenizer=auto (the model's own tokenizer) or set it to the tokenizer the model was trained with"
    if size > rows:
        raise ValueError(f"data.tokenizer={tokenizer_name} has {size} token ids but model {model_name} has only {rows} "
                         f"input embedding rows (ids >= {rows} have no embedding): {own}")
    if tokenizer_name == "builtin" and not model_name.startswith(TINY_MODEL_PREFIX) and size != rows:
        raise ValueError(f"data.tokenizer=builtin ({size} tokens) is not the tokenizer of model {model_name} "
                         f"({rows} embedding rows): its ids would select arbitrary embeddings. {own}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"data.tokenizer={tokenizer_name} has no eos token, which the trainers need (assistant turns "
                         "end with it, rollouts stop at it, padding falls back to it): use a tokenizer with "
                         "eos_token set (e.g. save one with tokenizer.eos_token = '<|im_end|>')")
    chat_template(tokenizer)

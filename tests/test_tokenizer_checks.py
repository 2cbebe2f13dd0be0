"""The model's own tokenizer, checked against the model (DESIGN rule 11), and real-model defaults.

    data.tokenizer=auto ─ tiny:* -> builtin; any other model.name -> that model's tokenizer + chat template
    check_tokenizer_fits_model at startup: ids < input embedding rows, builtin only with its own
    model, eos present (pad falls back to it), chat template present; a ValueError naming the fix

A "real" model here is a tiny Qwen3 saved with save_pretrained next to its own 300-token tokenizer
(trained in a second with `tokenizers`, a chat template unlike the builtin's): no hub access.
"""

import sys

import pytest

from tests.dist import run_distributed
from tests.test_rl import compose_rl
from tests.test_sft import FAST, ROOT, compose_cfg

OWN_VOCAB = 300
# ChatML with a marker the builtin template does not have, so the test can tell which template ran
OWN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + ' ~\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant ~\\n' }}{%- endif %}"
)
# what model=hf brings besides the model name, shrunk to a CPU test: 1 rank, tiny sequences
HF_FAST = [o for o in FAST if not o.startswith("model.tiny")] + ["model=hf", "model.cp=1",
                                                                   "model.activation_checkpointing=false"]


def own_tokenizer(vocab_size: int = OWN_VOCAB):
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_assets
    from transformers import PreTrainedTokenizerFast
    from trainer.data.records import load_sft_records
    texts = [m["content"] for r in load_sft_records("builtin", limit=300) for m in r["messages"]]
    hf = PreTrainedTokenizerFast(tokenizer_object=make_assets.train_tokenizer(texts, vocab_size),
                                 eos_token="<|im_end|>", pad_token="<|pad|>",
                                 additional_special_tokens=["<|endoftext|>", "<|im_start|>"])
    hf.chat_template = OWN_TEMPLATE
    return hf


def tiny_qwen3(vocab_size: int):
    from models.tiny import tiny_model
    return tiny_model("qwen3", vocab_size=vocab_size, hidden_size=64, num_layers=2)


@pytest.fixture(scope="module")
def own_model_dir(tmp_path_factory):
    """A saved model with its own tokenizer (300 ids, 300 embedding rows)."""
    path = tmp_path_factory.mktemp("own_model")
    tokenizer = own_tokenizer()
    assert len(tokenizer) == OWN_VOCAB
    tiny_qwen3(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    """A saved model (300 embedding rows) without tokenizer files."""
    path = tmp_path_factory.mktemp("bare_model")
    tiny_qwen3(OWN_VOCAB).save_pretrained(path)
    return path


def test_auto_resolves_to_builtin_for_tiny_models_and_to_the_model_otherwise():
    from trainer.data.tokenizer import resolve_tokenizer_name
    assert compose_cfg([]).data.tokenizer == "auto"
    assert resolve_tokenizer_name("auto", "tiny:qwen3_5") == "builtin"
    assert resolve_tokenizer_name("auto", "Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert resolve_tokenizer_name("auto", "outputs/sft/hf") == "outputs/sft/hf"  # the SFT export saved its own
    assert resolve_tokenizer_name("some/tokenizer", "Qwen/Qwen3-0.6B") == "some/tokenizer"


def _sft_worker(rank, world, overrides):
    from trainer.sft import run_sft
    history = run_sft(compose_cfg(HF_FAST + overrides))
    return [h["loss"] for h in history]


def test_a_real_model_trains_and_exports_with_its_own_tokenizer_and_chat_template(own_model_dir, tmp_path):
    """model=hf with a local model: its 300-token tokenizer and its template format the SFT rows, the
    run trains, and the export carries that tokenizer (the builtin 512-token one used to ride along)."""
    from transformers import AutoTokenizer
    from trainer.data.chat import tokenize_chat
    losses = run_distributed(_sft_worker, 1, [f"model.name={own_model_dir}", "max_steps=2", f"output_dir={tmp_path}",
                                              "checkpoint.export_hf=true"], timeout=300)[0]
    assert len(losses) == 2 and all(loss == loss for loss in losses), losses
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(exported) == OWN_VOCAB and exported.chat_template == OWN_TEMPLATE
    ids, mask = tokenize_chat(exported, [{"role": "user", "content": "2 + 3?"},
                                         {"role": "assistant", "content": "5"}])
    assert "user ~\n" in exported.decode(ids) and any(mask)


def _startup_error_worker(rank, world, overrides, match):
    from trainer.sft import run_sft
    with pytest.raises(ValueError, match=match):
        run_sft(compose_cfg(HF_FAST + overrides))
    return "raised"


def test_builtin_tokenizer_larger_than_the_embedding_table_is_refused_at_startup(bare_model_dir, tmp_path):
    """512 builtin ids next to 300 embedding rows: refused on every rank before any collective."""
    overrides = [f"model.name={bare_model_dir}", "data.tokenizer=builtin", "model.cp=2", f"output_dir={tmp_path}"]
    assert run_distributed(_startup_error_worker, 2, overrides,
                           r"data.tokenizer=builtin has 512 token ids but model .* has only 300 input embedding rows"
                           r".*data.tokenizer=auto", timeout=300) == ["raised", "raised"]


def test_builtin_tokenizer_next_to_a_pretrained_model_is_refused_even_when_ids_fit():
    """The 151k-vocab case: every builtin id is in range, but the embeddings mean something else."""
    from trainer.data.tokenizer import check_tokenizer_fits_model, load_tokenizer
    with pytest.raises(ValueError, match=r"data.tokenizer=builtin \(512 tokens\) is not the tokenizer of model "
                                         r"org/real-model \(1000 embedding rows\)"):
        check_tokenizer_fits_model(load_tokenizer("builtin"), tiny_qwen3(1000), tokenizer_name="builtin",
                                   model_name="org/real-model")
    # a tokenizer smaller than a padded embedding table is normal (Qwen3: 151669 ids, 151936 rows)
    check_tokenizer_fits_model(own_tokenizer(), tiny_qwen3(OWN_VOCAB + 64), tokenizer_name="org/real-model",
                               model_name="org/real-model")


def test_tokenizer_without_eos_or_chat_template_is_refused_and_pad_falls_back_to_eos():
    from trainer.data.tokenizer import check_tokenizer_fits_model, pad_token_id
    model, kw = tiny_qwen3(OWN_VOCAB), dict(tokenizer_name="org/tok", model_name="org/model")
    no_pad = own_tokenizer()
    no_pad.pad_token = None
    assert pad_token_id(no_pad) == no_pad.eos_token_id == no_pad.convert_tokens_to_ids("<|im_end|>")
    check_tokenizer_fits_model(no_pad, model, **kw)
    no_eos = own_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="data.tokenizer=org/tok has no eos token"):
        check_tokenizer_fits_model(no_eos, model, **kw)
    no_eos.pad_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        pad_token_id(no_eos)
    no_template = own_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*set data.tokenizer"):
        check_tokenizer_fits_model(no_template, model, **kw)


def test_a_model_directory_without_a_tokenizer_names_data_tokenizer(bare_model_dir):
    from trainer.data.tokenizer import load_tokenizer
    with pytest.raises(ValueError, match="set data.tokenizer to the model's tokenizer"):
        load_tokenizer(str(bare_model_dir))


def test_real_models_get_real_model_defaults_and_tiny_defaults_stay():
    sft_hf, rl_hf = compose_cfg(["model=hf"]), compose_rl(["model=hf"])
    for cfg in (sft_hf, rl_hf):
        assert cfg.optim.lr == 1e-5 and cfg.optim.warmup_steps == 10, cfg.optim
        assert cfg.model.name == "Qwen/Qwen3-0.6B" and cfg.model.dtype == "bfloat16" and cfg.data.tokenizer == "auto"
    assert compose_cfg(["model=hf", "optim.lr=2e-5"]).optim.lr == 2e-5
    assert compose_cfg([]).optim.lr == 3e-3 and compose_cfg(["model=tiny_qwen3"]).optim.lr == 3e-3
    rl = compose_rl([])
    assert rl.optim.lr == 1e-3 and rl.optim.schedule == "constant" and rl.model.name == "outputs/sft/hf"

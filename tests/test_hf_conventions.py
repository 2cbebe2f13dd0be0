"""transformers' calling conventions the mixer wrappers rely on: known ones work, unknown ones fail loudly.

transformers 5.23 hands a mixer its cache as `cache_params=`, 5.24 as `cache=`. A wrapper that reads
the wrong name does not see the cache at all and runs as if there were none (5.24 made the Gated
DeltaNet refusal of a training-time cache silently disappear). These tests pin:
  - the installed transformers is in the range pyproject.toml declares (and models.mixers.hf_conventions knows);
  - the installed decoder layers' cache reaches both wrappers (the model-level refusal fires);
  - both names are read; a Cache under an unknown keyword, or a mixer whose forward declares no
    known cache keyword, is refused (at the call, at wrap time) with the supported range named.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from transformers import Qwen3_5ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

import cp
import models
from models.mixers.hf_conventions import CACHE_KEYWORDS, SUPPORTED_TRANSFORMERS, cache_keyword, take_cache
from models.mixers.gated_deltanet import wrap_gated_deltanet
from models.mixers.mamba2 import wrap_mamba2_mixer
from models.tiny import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def test_installed_transformers_is_in_the_declared_and_tested_range():
    declared = re.search(r'^\s*"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert declared == f"transformers{SUPPORTED_TRANSFORMERS}", \
        f"pyproject.toml says {declared}, models.mixers.hf_conventions knows transformers{SUPPORTED_TRANSFORMERS}"
    assert transformers.__version__ in SpecifierSet(SUPPORTED_TRANSFORMERS), \
        f"transformers {transformers.__version__} is outside the tested range {SUPPORTED_TRANSFORMERS}"


@pytest.mark.parametrize("cls", [Qwen3_5GatedDeltaNet, NemotronHMamba2Mixer])
def test_installed_mixers_declare_a_known_cache_keyword(cls):
    mixer = cls(tiny_config("qwen3_5" if cls is Qwen3_5GatedDeltaNet else "nemotron_h"), layer_idx=0)
    assert cache_keyword(mixer) in CACHE_KEYWORDS


@pytest.mark.parametrize("family", ["qwen3_5", "nemotron_h"])
def test_the_decoder_layers_cache_reaches_the_wrapper(family):
    """The model-level call with HF's default cache and cp_params: the wrapper must see the cache the
    installed decoder layer passes (under whatever name) and act on it (GDN refuses any cache under CP;
    Mamba2 refuses a filled one)."""
    model = tiny_model(family, num_layers=4)
    models.apply_cp(model, cp.ParallelDims(world_size=1, cp=1))
    model.config.use_cache = True  # what a user who flips it back gets
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    batch = cp.setup_cp_params(ids)
    kw = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params)
    if family == "qwen3_5":
        with pytest.raises(ValueError, match="use_cache=False"):
            model(**kw)
        return
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 / 5.23
        model(**kw, **{cache_kw: cache}, use_cache=True)  # an empty cache: left alone under CP
        layer = next(i for i, t in enumerate(model.config.layers_block_type) if t == "linear_attention")
        assert cache.get_conv_state(layer) is None, "the CP path must not fill a generation cache"


def _gdn_and_mamba():
    torch.manual_seed(0)
    return [wrap_gated_deltanet(Qwen3_5GatedDeltaNet(tiny_config("qwen3_5"), layer_idx=0)),
            wrap_mamba2_mixer(NemotronHMamba2Mixer(tiny_config("nemotron_h"), layer_idx=0))]


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_both_cache_names_are_read(keyword):
    hidden = torch.randn(1, 10, 64)
    params = cp.setup_cp_params(torch.zeros(1, 10, dtype=torch.long)).params
    gdn, mamba = _gdn_and_mamba()
    with pytest.raises(ValueError, match="use_cache=False"):
        gdn(hidden, cp_params=params, **{keyword: DynamicCache(config=tiny_config("qwen3_5"))})
    filled = DynamicCache(config=tiny_config("nemotron_h"))
    with torch.no_grad():
        mamba._original.eval()(hidden, **{cache_keyword(mamba._original): filled})  # the original fills it
    with pytest.raises(ValueError, match="use_cache=False"):
        mamba(hidden, cp_params=params, **{keyword: filled})


def test_a_cache_under_an_unknown_keyword_is_refused():
    hidden = torch.randn(1, 10, 64)
    params = cp.setup_cp_params(torch.zeros(1, 10, dtype=torch.long)).params
    for wrapper in _gdn_and_mamba():
        with pytest.raises(ValueError, match="past_key_values.*supported: transformers"):
            wrapper(hidden, cp_params=params, past_key_values=DynamicCache(config=tiny_config("qwen3_5")))
    with pytest.raises(ValueError, match="two different caches"):
        take_cache({"cache": DynamicCache(), "cache_params": DynamicCache()}, "mixer")


@pytest.mark.parametrize("base,family", [(Qwen3_5GatedDeltaNet, "qwen3_5"), (NemotronHMamba2Mixer, "nemotron_h")])
def test_a_mixer_with_an_unknown_cache_convention_is_refused_at_wrap_time(base, family):
    """A future transformers renaming the keyword again: refused when apply_cp wraps, not ignored at step 900."""

    def forward(self, hidden_states, recurrent_state=None, attention_mask=None, **kwargs):
        return base.forward(self, hidden_states, attention_mask=attention_mask, **kwargs)

    renamed = type(base.__name__, (base,), {"forward": forward})  # same class name: the wrappers accept it
    mixer = renamed(tiny_config(family), layer_idx=0)
    wrap = wrap_gated_deltanet if family == "qwen3_5" else wrap_mamba2_mixer
    with pytest.raises(ValueError, match=r"none of \['cache', 'cache_params'\].*transformers>=5\.23"):
        wrap(mixer)


def test_a_generation_cache_still_reaches_the_original_module():
    """Without cp_params a cache goes to the original module under the keyword it declares (HF decoding)."""
    torch.manual_seed(1)
    model = Qwen3_5ForCausalLM(tiny_config("qwen3_5", num_layers=2))
    reference = Qwen3_5ForCausalLM(tiny_config("qwen3_5", num_layers=2))
    reference.load_state_dict(model.state_dict())
    for layer in model.model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn = wrap_gated_deltanet(layer.linear_attn)
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.eval().generate(ids, **kw), reference.eval().generate(ids, **kw))

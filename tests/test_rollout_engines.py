"""The rollout engine interface (trainer/rl/rollout/base.py) and the hf engine's batched generation."""

import pytest
import torch

from models.tiny import tiny_model
from trainer.data.tokenizer import load_tokenizer
from trainer.rl.rollout.base import Completion, SamplingSettings, StaleRolloutError, check_versions, cut_at_end
from trainer.rl.rollout.hf import HFRolloutEngine, left_padded


def test_check_versions_refuses_other_weights():
    ok = [Completion([1, 2], [-0.1, -0.2], 3), Completion([4], [-0.3], 3)]
    check_versions(ok, expected=3)
    with pytest.raises(StaleRolloutError, match=r"1 of 3 rollouts were sampled with weight version\(s\) \[2\]"):
        check_versions(ok + [Completion([5], [-0.4], 2)], expected=3)


def test_cut_at_end_keeps_the_end_token():
    assert cut_at_end([5, 6, 2, 7, 2], 2) == [5, 6, 2]
    assert cut_at_end([5, 6], 2) == [5, 6]


def test_left_padding_right_aligns_prompts():
    ids, mask = left_padded([[7, 8, 9], [5]], pad_id=0, device="cpu")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_one_batched_generate_equals_each_prompt_alone(family):
    """A rank's prompts of different lengths go to generate in ONE left-padded batch (pad tokens masked,
    positions from each row's first real token; Qwen3.5's DeltaNet and conv see zeros for the pads): every
    prompt's greedy completion equals the one it gets alone, and the sampled tokens' log-probs equal a
    teacher-forced forward of the prompt alone (fp32: only the padded batch's summation order differs)."""
    tokenizer = load_tokenizer("builtin")
    model = tiny_model(family, vocab_size=len(tokenizer), hidden_size=64, num_layers=2)
    engine = HFRolloutEngine(model, tokenizer, torch.device("cpu"))
    engine.sync(model, version=0)
    prompts = [tokenizer.encode(t) for t in ("What is 2 + 2?", "Sort the letters of the word banana please.",
                                             "Hi")]
    assert len({len(p) for p in prompts}) == 3
    batched = engine.greedy(prompts, max_new_tokens=10)
    alone = [engine.greedy([p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    groups = engine.sample(prompts, SamplingSettings(n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3))
    assert [len(g) for g in groups] == [2, 2, 2] and all(c.version == 0 for g in groups for c in g)
    worst = 0.0
    for prompt, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # [T, V]
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            worst = max(worst, (logp - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 1e-4, f"batched sampling log-probs vs the prompt alone: max abs diff {worst:.3g}"

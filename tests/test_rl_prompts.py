"""GRPO on the user's own prompts: the answer extractor, batched and per-sample reward signatures, prompt
datasets (columns reaching the rewards, held-out eval rows), and 2 GRPO steps at cp=2 on the bundled
math word problems (configs/data/math_prompts.yaml)."""

import json
import math

import pytest

from tests.dist import run_distributed
from tests.test_rl import RL_FAST, compose_rl
from trainer import config
from trainer.rl import tasks
from trainer.data.chat import template_ids
from trainer.rl.prompts import load_rl_prompts, make_prompts, split_eval_prompts
from trainer.data.records import ASSETS_DIR
from trainer.rl.tasks import answers_match, as_batched, extract_final_answer, resolve_batched_reward
from trainer.data.tokenizer import load_tokenizer

SEEN_COLUMNS = []


def id_reward(prompts, completions, *, answer, id, **columns):
    """A batched user reward that needs the dataset's `id` column: 1.0 per completion of an mwp-* row."""
    assert len(prompts) == len(completions) == len(answer) == len(id)
    SEEN_COLUMNS.append(sorted(["answer", "id", *columns]))
    return [1.0 if str(i).startswith("mwp-") and a else 0.0 for i, a in zip(id, answer)]


def legacy_reward(prompt, completion, answer):
    return float(completion.strip() == answer)


def two_args(prompt, completion):
    return 0.0


# ---------------------------------------------------------------- the answer extractor


@pytest.mark.parametrize("completion,expected", [
    ("62 + 71 = 133\n<answer>133</answer>", "133"),  # the tag wins
    ("<answer>1</answer> so \\boxed{2}", "1"),
    ("so the total is \\boxed{\\frac{1}{2}} apples", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{3}, then \\boxed{4}", "4"),  # the last box
    ("62 plus 71. The answer is 133.", "133"),
    ("the answer: $1,234", "1,234"),
    ("It is 5 apples, then 7, so 12 in all", "12"),  # else the last number
    ("I am not sure", None),
])
def test_extract_final_answer_accepts_the_usual_conventions(completion, expected):
    assert extract_final_answer(completion) == expected


@pytest.mark.parametrize("extracted,answer,match", [
    ("133", "133", True), ("1,234", "1234", True), ("12.0", "12", True), ("x = 5", "5", True),
    ("134", "133", False), ("72", "Natalia sold 48/2 = 24 clips ... #### 72", True),  # GSM8K answers
    ("Paris", "paris", True), (None, "1", False),
])
def test_answers_match_numbers_and_text(extracted, answer, match):
    assert answers_match(extracted, answer) is match


def test_natural_answers_score_on_user_data_and_builtin_stays_strict():
    natural = "62 + 71 = 133. The answer is 133."
    assert tasks.correctness_reward("What is 62 + 71?", natural, "133") == 0.0, "built-in tasks: the tag only"
    open_correctness = resolve_batched_reward("correctness", open_answers=True)
    assert open_correctness(["What is 62 + 71?"] * 2, [natural, "It is 134"], answer=["133", "133"]) == [1.0, 0.0]
    strict = resolve_batched_reward("correctness", open_answers=False)
    assert strict(["q"], [natural], answer=["133"]) == [0.0]


# ---------------------------------------------------------------- reward signatures


def test_batched_rewards_pass_through_and_per_sample_ones_are_adapted():
    assert as_batched(id_reward) is id_reward
    assert resolve_batched_reward("tests.test_rl_prompts:id_reward") is id_reward
    adapted = resolve_batched_reward("tests.test_rl_prompts:legacy_reward")
    assert adapted(["p", "p"], ["7", "8"], answer=["7", "7"], id=["a", "b"]) == [1.0, 0.0]
    scores = tasks.score([adapted, id_reward], ["p"], ["7"], {"answer": ["7"], "id": ["mwp-1"], "level": [2]})
    assert scores == [[1.0], [1.0]]


def test_reward_signature_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"takes neither .*change its signature"):
        as_batched(two_args)
    with pytest.raises(ValueError, match=r"no `answer` column \(columns: id\).*make the reward batched"):
        resolve_batched_reward("tests.test_rl_prompts:legacy_reward")(["p"], ["c"], id=["x"])
    with pytest.raises(ValueError, match="returned 2 scores for 1 completions"):
        tasks.score([lambda prompts, completions, **columns: [0.0, 1.0]], ["p"], ["c"], {})


# ---------------------------------------------------------------- prompt datasets


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_prompt_rows_keep_every_other_column_and_apply_the_chat_template(tmp_path):
    tok = load_tokenizer("builtin")
    source = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 62 + 71?", "answer": 133, "level": "easy"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                      {"role": "assistant", "content": "4"}], "answer": "4"},
    ])
    first, second = load_rl_prompts(source, tok, system_prompt="Think.")
    assert (first.prompt, first.answer, first.columns) == ("What is 62 + 71?", "133", {"answer": 133, "level": "easy"})
    assert first.reward_columns() == {"answer": 133, "level": "easy"}
    assert first.input_ids == template_ids(tok, [{"role": "system", "content": "Think."},
                                                 {"role": "user", "content": "What is 62 + 71?"}], True)
    # messages rows keep their own system turn; the reference assistant turn is dropped
    assert second.prompt == "2 + 2?"
    assert second.input_ids == template_ids(tok, [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "2 + 2?"}], True)
    builtin = make_prompts("add", 1, 0, tok)[0]
    assert builtin.reward_columns() == {"answer": builtin.answer, "task": "add"}


def test_eval_rows_are_the_last_ones_and_errors_name_the_fix(tmp_path):
    tok = load_tokenizer("builtin")
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    train, held_out = split_eval_prompts(load_rl_prompts(write_jsonl(tmp_path / "p.jsonl", rows), tok), 3)
    assert [p.prompt for p in train] == [f"q{i}" for i in range(7)]
    assert [p.prompt for p in held_out] == ["q7", "q8", "q9"]
    with pytest.raises(ValueError, match="rollout.eval_prompts=10 must .* the dataset has 10"):
        split_eval_prompts(train + held_out, 10)
    with pytest.raises(ValueError, match=r"needs a `prompt` .* or a `messages` column; it has \['question'\]"):
        load_rl_prompts(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}]), tok)
    with pytest.raises(ValueError, match="must end with a user message"):
        load_rl_prompts(write_jsonl(tmp_path / "bad2.jsonl", [{"messages": [
            {"role": "assistant", "content": "hi"}]}]), tok)


def test_config_accepts_prompt_datasets_and_refuses_keys_only_a_dataset_uses():
    config.validate_rl(compose_rl(RL_FAST + ["data=math_prompts"]), 2)
    config.validate_rl(compose_rl(RL_FAST + ["data.source=my_prompts.jsonl", "data.limit=100"]), 2)
    with pytest.raises(ValueError, match="data.limit=8 leaves no training rows"):
        config.validate_rl(compose_rl(RL_FAST + ["data=math_prompts", "data.limit=8", "rollout.eval_prompts=8"]), 2)
    with pytest.raises(ValueError, match="rollout.system_prompt is only used with a user prompt dataset"):
        config.validate_rl(compose_rl(RL_FAST + ["rollout.system_prompt=hi"]), 2)


def test_math_prompts_example_holds_out_its_last_rows():
    from trainer.rl.loop import build_prompt_sets
    cfg = compose_rl(RL_FAST + ["data=math_prompts", "rollout.eval_prompts=8"])
    pool, held_out = build_prompt_sets(cfg, load_tokenizer("builtin"))
    assert len(pool) + len(held_out) == 48 and len(held_out) == 8
    assert not {p.prompt for p in pool} & {p.prompt for p in held_out}
    assert all(answers_match(p.answer, p.answer) and p.columns["id"].startswith("mwp-") for p in pool)
    with pytest.raises(ValueError, match=r"row \d+ is \d+ prompt tokens; data.seq_len=32 .* raise data.seq_len"):
        build_prompt_sets(compose_rl(RL_FAST + ["data=math_prompts", "data.seq_len=32"]), load_tokenizer("builtin"))


def _run_worker(rank, world, overrides):
    from trainer.rl.loop import run_rl
    history = run_rl(compose_rl(RL_FAST + overrides))
    return history, SEEN_COLUMNS


def test_two_grpo_steps_on_the_math_prompts_at_cp2(tmp_path):
    name = "tests.test_rl_prompts:id_reward"
    history, seen = run_distributed(_run_worker, 2, [
        "data=math_prompts", "model.name=tiny:qwen3", "model.cp=2", "loss.type=gspo", f"output_dir={tmp_path}",
        "rollout.eval_prompts=4", f"reward.functions=[correctness,format,'{name}']", "reward.weights=[1.0,0.2,0.1]",
    ], timeout=600)[0]
    assert [h["step"] for h in history] == [1, 2]
    assert all(h[f"reward_{name}"] == 1.0 for h in history), "the id and answer columns reached the reward"
    assert seen and all(columns == ["answer", "id", "messages"] for columns in seen)  # messages: the episode's
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["reward_correctness"]) for h in history)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    rows = (ASSETS_DIR / "math_word_problems.jsonl").read_text().splitlines()
    prompts = {json.loads(line)["prompt"] for line in rows}
    assert samples and all(s["prompt"] in prompts for s in samples)

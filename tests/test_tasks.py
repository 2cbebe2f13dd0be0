"""Built-in tasks (deterministic, exact answers), answer extraction and the reward interface."""

import pytest

from trainer.rl.tasks import (REWARDS, TASKS, correctness_reward, extract_answer, format_answer, format_reward,
                           make_examples, resolve_reward, task_messages)


def length_reward(prompt: str, completion: str, answer: str) -> float:
    """A user reward for the dotted-path tests."""
    return float(len(completion))


NOT_A_FUNCTION = 3

# ---------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", sorted(TASKS))
def test_examples_are_deterministic_by_seed_and_differ_across_seeds(task):
    assert make_examples(task, 20, seed=1) == make_examples(task, 20, seed=1)
    assert make_examples(task, 20, seed=1) != make_examples(task, 20, seed=2)


def _expected_answer(example: dict) -> str:
    prompt = example["prompt"]
    if prompt.startswith("What is "):
        a, op, b = prompt[len("What is "):-1].split()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    word = prompt.split('"')[1]
    return word[::-1] if prompt.startswith("Reverse") else "".join(sorted(word))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_exact_and_reference_completions_earn_full_reward(task):
    for example in make_examples(task, 50, seed=0):
        assert example["answer"] == _expected_answer(example), example
        assert example["completion"].endswith(format_answer(example["answer"]))
        assert correctness_reward(example["prompt"], example["completion"], example["answer"]) == 1.0
        assert format_reward(example["prompt"], example["completion"], example["answer"]) == 1.0


def test_operands_stay_small_and_subtraction_never_goes_negative():
    for example in make_examples("arithmetic", 300, seed=3):
        a, op, b = example["prompt"][len("What is "):-1].split()
        assert 0 <= int(a) <= (12 if op == "*" else 99) and 0 <= int(b) <= (12 if op == "*" else 99)
        assert int(example["answer"]) >= 0


def test_mixtures_record_the_concrete_task_and_cover_all_of_them():
    assert {ex["task"] for ex in make_examples("mixed", 200, seed=0)} == {"add", "sub", "mul", "reverse", "sort"}
    assert {ex["task"] for ex in make_examples("arithmetic", 100, seed=0)} == {"add", "sub", "mul"}


def test_exclude_prompts_gives_a_disjoint_set_and_unknown_tasks_fail():
    train = {ex["prompt"] for ex in make_examples("mul", 100, seed=0)}
    held_out = make_examples("mul", 30, seed=1, exclude_prompts=train)
    assert not train & {ex["prompt"] for ex in held_out}
    with pytest.raises(ValueError, match="unknown task 'division'.*add"):
        make_examples("division", 1, seed=0)
    with pytest.raises(ValueError, match="could not draw"):
        make_examples("mul", 5, seed=0, exclude_prompts={ex["prompt"] for ex in make_examples("mul", 5000, seed=9)})


def test_task_messages_put_system_user_and_assistant_in_order():
    assert [m["role"] for m in task_messages("q", "a")] == ["system", "user", "assistant"]
    assert task_messages("q", system_prompt=None) == [{"role": "user", "content": "q"}]


# ---------------------------------------------------------------- answers and rewards


@pytest.mark.parametrize("completion, expected", [
    ("12 + 3 = 15\n<answer>15</answer>", "15"),
    ("<answer> 15 \n</answer>", "15"),
    ("<answer>1</answer> no wait <answer>2</answer>", "2"),  # the last answer counts
    ("<answer>multi\nline</answer>", "multi\nline"),
    ("15", None),
    ("<answer>15", None),
    ("</answer>15<answer>", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_correctness_reward_compares_the_extracted_answer_exactly():
    assert correctness_reward("What is 1 + 1?", "<answer>2</answer>", "2") == 1.0
    assert correctness_reward("What is 1 + 1?", "<answer> 2 </answer>", " 2\n") == 1.0
    assert correctness_reward("What is 1 + 1?", "<answer>3</answer>", "2") == 0.0
    assert correctness_reward("What is 1 + 1?", "<answer>02</answer>", "2") == 0.0
    assert correctness_reward("What is 1 + 1?", "the answer is 2", "2") == 0.0


@pytest.mark.parametrize("completion, expected", [
    ("1 + 1 = 2\n<answer>2</answer>", 1.0),
    ("<answer>2</answer>\n<|im_end|>", 1.0),  # end-of-turn markers after the tag are fine
    ("<answer>2</answer> and then more", 0.5),  # one tag, but not at the end
    ("<answer>2</answer><answer>3</answer>", 0.0),  # more than one tag
    ("<answer>  </answer>", 0.0),  # empty
    ("<answer>2", 0.0),  # not closed
    ("</answer>2<answer>", 0.0),  # wrong order
    ("2", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward("p", completion, "2") == expected


def test_resolve_reward_accepts_builtin_names_dotted_paths_and_callables():
    assert resolve_reward("correctness") is correctness_reward
    assert resolve_reward("format") is format_reward
    assert set(REWARDS) == {"correctness", "similarity", "restate", "consistency", "format"}
    assert resolve_reward("tests.test_tasks:length_reward") is length_reward
    assert resolve_reward("tests.test_tasks.length_reward") is length_reward
    assert resolve_reward(length_reward) is length_reward
    assert resolve_reward("tests.test_tasks:length_reward")("p", "abc", "a") == 3.0


@pytest.mark.parametrize("spec, message", [
    ("exactness", "unknown reward 'exactness'; built-ins: correctness, similarity, restate, consistency, format"),
    ("tests.no_such_module:fn", "cannot import module 'tests.no_such_module'"),
    ("tests.test_tasks:no_such_fn", "has no attribute 'no_such_fn'"),
    ("tests.test_tasks:NOT_A_FUNCTION", "non-callable int"),
    ("", "must be a name"),
])
def test_resolve_reward_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve_reward(spec)


def test_similarity_reward_grades_partial_answers():
    from trainer.rl.tasks import similarity_reward
    assert similarity_reward("", "<answer>102</answer>", "102") == 1.0
    assert similarity_reward("", "<answer>126</answer>", "102") == 1 - 2 / 3
    assert similarity_reward("", "<answer>10</answer>", "102") == 1 - 1 / 3
    assert similarity_reward("", "no tag", "102") == 0.0
    assert similarity_reward("", "<answer>zca</answer>", "acz") == 1 - 2 / 3


def test_restate_reward_checks_the_working_line_against_the_prompt():
    from trainer.rl.tasks import restate_reward
    assert restate_reward("What is 23 + 58?", "23 + 58 = 81\n<answer>81</answer>", "81") == 1.0
    assert restate_reward("What is 23 + 58?", "23 + 5 = 28\n<answer>28</answer>", "81") == 0.0
    assert restate_reward('Reverse the letters of "acz".', "a c z -> z c a\n<answer>zca</answer>", "zca") == 1.0
    assert restate_reward('Reverse the letters of "acz".', "a z c -> c z a\n<answer>cza</answer>", "zca") == 0.0
    assert restate_reward("Something else", "x", "y") == 0.0


def test_consistency_reward_compares_the_tag_with_the_working_line():
    from trainer.rl.tasks import consistency_reward
    assert consistency_reward("", "98 - 4 = 94\n<answer>94</answer>", "94") == 1.0
    assert consistency_reward("", "98 - 4 = 33\n<answer>39</answer>", "94") == 0.0
    assert consistency_reward("", "19 - 17 = 49\n<answer>49</answer>", "2") == 1.0  # consistent, wrong
    assert consistency_reward("", "a c z -> z c a\n<answer>zca</answer>", "zca") == 1.0
    assert consistency_reward("", "a c z -> z c a\n<answer>zac</answer>", "zca") == 0.0
    assert consistency_reward("", "<answer>3</answer>", "3") == 0.0

"""Answers on prompt datasets checked with math-verify (trainer/rl/math_answers.py): equivalent forms accepted,
wrong ones refused, word answers compared as text, the built-in tasks' strict <answer> tag unchanged, and the check
usable from the async GRPO producer thread (math-verify's signal timeout only works in the main thread)."""

import threading
import time

import pytest

from trainer.rl import tasks
from trainer.rl.math_answers import answers_equivalent, is_word_answer


@pytest.mark.parametrize("prediction,gold", [
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "1/2"), ("\\dfrac12", "0.5"),
    ("1,000", "1000"), ("1000", "1,000"), ("12.0", "12"), ("\\$1,234.00", "1234"), ("-\\frac{3}{4}", "-3/4"),
    ("x=3", "3"), ("x = 5", "5"), ("3", "x=3"),  # an assignment counts for its value
    ("5 apples", "5"), ("3\\text{ cm}", "3"), ("so 12 in all", "12"), ("The answer is 72.", "72"),
    ("\\frac{2}{\\sqrt{2}}", "\\sqrt{2}"), ("6.283185", "2\\pi"), ("(x+1)^2", "x^2+2x+1"), ("10^{3}", "1000"),
    ("\\{4, 3\\}", "3, 4"),
])
def test_equivalent_forms_are_accepted(prediction, gold):
    assert answers_equivalent(prediction, gold)


@pytest.mark.parametrize("prediction,gold", [
    ("134", "133"), ("\\frac{1}{3}", "0.333"), ("-3", "3"), ("\\frac{2}{3}", "0.5"), ("3, 4", "4"),
    ("x=4", "3"), ("three", "3"), ("", "3"), (None, "3"), ("2", "2\\pi"),
])
def test_wrong_answers_are_refused(prediction, gold):
    assert not answers_equivalent(prediction, gold)


def test_word_answers_are_compared_as_text():
    assert is_word_answer("Paris") and is_word_answer("New York") and is_word_answer("\\text{B}")
    assert not is_word_answer("3") and not is_word_answer("\\frac{1}{2}") and not is_word_answer("a+b")
    assert answers_equivalent("paris", "Paris") and answers_equivalent("\\text{Paris}", "Paris")
    assert answers_equivalent("Yes.", "yes") and answers_equivalent("B", "B")
    assert not answers_equivalent("London", "Paris") and not answers_equivalent("(B)", "A")


def test_open_rewards_read_the_usual_conventions_and_check_with_math_verify():
    reward = tasks.open_correctness_reward
    assert reward("q", "Half of 1 is \\boxed{\\frac{1}{2}}.", "0.5") == 1.0
    assert reward("q", "so <answer>1/2</answer>", "0.5") == 1.0
    assert reward("q", "The answer is $\\frac{1}{2}$.", "0.5") == 1.0  # math in $..$ after "answer is"
    assert reward("q", "The answer is $2\\pi$.", "2\\pi") == 1.0
    assert reward("q", "She sold 1,000 cups in all.", "Natalia ... #### 1000") == 1.0  # GSM8K answer, last number
    assert reward("q", "\\boxed{x=3}", "3") == 1.0
    assert reward("q", "\\boxed{\\frac{1}{3}}", "0.5") == 0.0
    assert reward("q", "The capital is <answer>Paris</answer>", "paris") == 1.0
    assert reward("q", "I am not sure", "3") == 0.0
    similarity = tasks.open_similarity_reward
    assert similarity("q", "\\boxed{\\frac{1}{2}}", "0.5") == 1.0  # the exact branch uses the same check
    assert similarity("q", "<answer>134</answer>", "133") == pytest.approx(1 - 1 / 3)  # edit-distance credit
    assert tasks.OPEN_ANSWER_REWARDS["correctness"] is reward


def test_builtin_tasks_keep_the_strict_answer_tag():
    assert tasks.correctness_reward("What is 62 + 71?", "62 + 71 = \\boxed{133}", "133") == 0.0
    assert tasks.correctness_reward("What is 62 + 71?", "The answer is 133.", "133") == 0.0
    assert tasks.correctness_reward("What is 62 + 71?", "62 + 71 = 133\n<answer>133</answer>", "133") == 1.0
    assert tasks.correctness_reward("What is 1/2?", "<answer>0.5</answer>", "1/2") == 0.0  # exact, no math-verify
    strict = tasks.resolve_batched_reward("correctness", open_answers=False)
    assert strict(["q"], ["\\boxed{133}"], answer=["133"]) == [0.0]


def run_in_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except Exception as e:  # reported to the test
            out["error"] = e
    worker = threading.Thread(target=target)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the check hung in a non-main thread"
    return out


def test_math_verify_defaults_fail_off_the_main_thread_and_the_wrapper_does_not():
    from math_verify import parse
    assert "ValueError" in repr(run_in_thread(lambda: parse("$\\frac{1}{2}$")).get("error")), \
        "math-verify now works in threads with its signal timeout: math_answers._timeout may be simplified"
    results = run_in_thread(lambda: [answers_equivalent("\\frac{1}{2}", "0.5"), answers_equivalent("134", "133"),
                                     tasks.open_correctness_reward("q", "\\boxed{1,000}", "1000")])
    assert results == {"value": [True, False, 1.0]}


def test_predictions_sympy_cannot_finish_are_refused_quickly_in_a_thread():
    # without math-verify's timeout (off the main thread) each of these made verify() run for minutes or forever
    hard = ["10^{10^{10^{10}}}", "(10^{100})!", "\\binom{10^{8}}{5\\cdot 10^{7}}", "\\prod_{k=1}^{10^{9}} k",
            "(x+1)^{1000}", "\\sin(10^{10^{10}})"]
    start = time.perf_counter()
    results = run_in_thread(lambda: [answers_equivalent(p, "3") for p in hard])
    assert results == {"value": [False] * len(hard)}
    assert time.perf_counter() - start < 30

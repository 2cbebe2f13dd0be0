"""Built-in verifiable tasks (exact answers) and the rewards that grade them.

    TASKS["add"](rng) ─> {"prompt": "What is 23 + 58?", "answer": "81",
                          "completion": "23 + 58 = 81\\n<answer>81</answer>"}
    make_examples(task, n, seed)    n examples, deterministic by seed (train and eval use other seeds)
      │
      ├─> scripts/make_assets.py     the bundled SFT rows (system + user + assistant = completion)
      ├─> trainer.rl.prompts.make_prompts  RL prompts (system + user, generation prompt) and their answers
      └─> trainer.rl.prompts.make_eval_prompts   held-out RL eval prompts: every task_components(task) in equal shares

    completion from the policy ─> Reward(prompt, completion, answer) -> float
                                   correctness_reward: extract_answer(completion) == answer
                                   format_reward:      one well-formed <answer>...</answer> at the end

    trainer/rl/loop.py calls every reward batched: fn(prompts, completions, **columns) -> list[float]
      resolve_batched_reward(spec, open_answers)   a reward with **columns is batched already; a
                                   per-sample (prompt, completion, answer) one is adapted (columns["answer"])
      open_answers (data.source is a user dataset): correctness / similarity read extract_final_answer:
                                   <answer>..</answer>, \\boxed{..}, "The answer is N", else the last number;
                                   answers_match compares it with math-verify (trainer.rl.math_answers: 0.5 ==
                                   \\frac{1}{2}, 1,000 == 1000; word answers as text); built-in tasks keep the
                                   strict <answer> tag and exact match (what their SFT data teaches)

The model must answer in ANSWER_FORMAT ("<answer>81</answer>"); a short working line before the
tag is allowed. Rewards are plain functions; `resolve_reward` turns a config string (a built-in
name or an importable "pkg.mod:fn") into one.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import string
from collections.abc import Callable, Collection, Sequence

from trainer.rl.math_answers import answers_equivalent

Reward = Callable[[str, str, str], float]  # (prompt, completion, answer) -> reward
BatchedReward = Callable[..., list]  # (prompts, completions, **columns) -> [reward per completion]
TaskFn = Callable[[random.Random], dict]  # rng -> {"prompt", "answer", "completion"}

SYSTEM_PROMPT = "Solve the task. Give the final answer as <answer>...</answer>."
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
ANSWER_FORMAT = ANSWER_OPEN + "{}" + ANSWER_CLOSE
_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
# end-of-turn markers a decoder may leave at the end of a completion (ignored by format_reward)
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|pad|>")


def format_answer(answer: str) -> str:
    """The answer wrapped in the tag the model must produce: "81" -> "<answer>81</answer>"."""
    return ANSWER_FORMAT.format(answer)


# ---------------------------------------------------------------- tasks


def _arithmetic(a: int, op: str, b: int, result: int) -> dict:
    question = f"{a} {op} {b}"
    answer = str(result)
    return {"prompt": f"What is {question}?", "answer": answer,
            "completion": f"{question} = {answer}\n{format_answer(answer)}"}


def add_task(rng: random.Random) -> dict:
    """Addition of two numbers in [0, 99]."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return _arithmetic(a, "+", b, a + b)


def add_small_task(rng: random.Random) -> dict:
    """Addition of two digits in [0, 9]: the RL default, where a small SFT model is right part of the time."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return _arithmetic(a, "+", b, a + b)


def sub_task(rng: random.Random) -> dict:
    """Subtraction a - b with 0 <= b <= a <= 99 (never negative)."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return _arithmetic(a, "-", b, a - b)


def mul_task(rng: random.Random) -> dict:
    """Multiplication table: two numbers in [0, 12]."""
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    return _arithmetic(a, "*", b, a * b)


def _random_word(rng: random.Random, min_len: int = 3, max_len: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))


def _letter_task(word: str, instruction: str, result: str) -> dict:
    # the working line spells the letters out, one token-ish unit each, so a small model can copy them
    return {"prompt": f'{instruction} "{word}".', "answer": result,
            "completion": f"{' '.join(word)} -> {' '.join(result)}\n{format_answer(result)}"}


def reverse_task(rng: random.Random) -> dict:
    """Reverse a random lowercase word of 3-5 letters."""
    word = _random_word(rng)
    return _letter_task(word, "Reverse the letters of", word[::-1])


def sort_task(rng: random.Random) -> dict:
    """Sort the letters of a random lowercase word of 3-5 letters alphabetically."""
    word = _random_word(rng)
    return _letter_task(word, "Sort alphabetically the letters of", "".join(sorted(word)))


def _mixture(names: tuple[str, ...]) -> TaskFn:
    def sample(rng: random.Random) -> dict:
        name = rng.choice(names)
        return {**TASKS[name](rng), "task": name}

    sample.__doc__ = f"One of {', '.join(names)}, chosen uniformly."
    return sample


TASKS: dict[str, TaskFn] = {
    "add": add_task,
    "add_small": add_small_task,
    "sub": sub_task,
    "mul": mul_task,
    "reverse": reverse_task,
    "sort": sort_task,
}
MIXTURES: dict[str, tuple[str, ...]] = {"arithmetic": ("add", "sub", "mul"),
                                        "mixed": ("add", "sub", "mul", "reverse", "sort")}
TASKS.update({name: _mixture(parts) for name, parts in MIXTURES.items()})


def task_components(task: str) -> tuple[str, ...]:
    """The concrete tasks a task draws from: ("add", "sub", "mul") for "arithmetic", ("add",) for "add"."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
    return MIXTURES.get(task, (task,))


def make_examples(task: str, n: int, seed: int, *, exclude_prompts: Collection[str] = ()) -> list[dict]:
    """`n` examples of `task`, the same for the same seed: dicts with `prompt`, `answer`, the reference
    `completion` (working line + answer tag) and `task` (the concrete task for mixtures).

    exclude_prompts: prompts never to produce (e.g. the training prompts, for a disjoint eval set).
    Examples may repeat otherwise (the task spaces are small: mul has 169 questions)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    rng = random.Random(seed)
    examples, attempts = [], 0
    while len(examples) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not draw {n} examples of {task!r} outside the {len(exclude_prompts)} "
                             "excluded prompts: ask for fewer")
        example = {"task": task, **TASKS[task](rng)}
        if example["prompt"] not in exclude_prompts:
            examples.append(example)
    return examples


def task_messages(prompt: str, completion: str | None = None, *,
                  system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The chat messages of a task: [system], user prompt, [assistant completion]."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


# ---------------------------------------------------------------- answers and rewards


def extract_answer(completion: str) -> str | None:
    """The content of the LAST <answer>...</answer> in `completion`, stripped; None if there is none."""
    matches = _ANSWER_RE.findall(completion)
    return matches[-1].strip() if matches else None


def _strip_end_markers(text: str) -> str:
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for marker in _END_MARKERS:
            if text.endswith(marker):
                text, changed = text[: -len(marker)].rstrip(), True
    return text


def correctness_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the extracted answer equals `answer` exactly (surrounding whitespace ignored), else 0.0."""
    extracted = extract_answer(completion)
    return 1.0 if extracted is not None and extracted == answer.strip() else 0.0


def format_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 for exactly one non-empty <answer>...</answer> that ends the completion (end-of-turn tokens
    and whitespace after it are fine); 0.5 when that one tag is followed by more text; else 0.0."""
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
        return 0.0
    match = _ANSWER_RE.search(completion)
    if match is None or not match.group(1).strip():
        return 0.0
    return 1.0 if not _strip_end_markers(completion[match.end():]) else 0.5


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity_reward(prompt: str, completion: str, answer: str) -> float:
    """Partial credit: 1 - edit distance / max length between the extracted answer and `answer`
    (1.0 exactly when correct, 0.0 without an answer). Still verifiable, and it grades how close a
    wrong answer is (digit count, shared digits or letters), which a small model can climb."""
    extracted = extract_answer(completion)
    if extracted is None:
        return 0.0
    target = answer.strip()
    return 1.0 - _edit_distance(extracted, target) / max(len(extracted), len(target), 1)


_ARITHMETIC_PROMPT = re.compile(r"^What is (\d+ [-+*] \d+)\?$")
_LETTER_PROMPT = re.compile(r'"([a-z]+)"\.$')


def restate_reward(prompt: str, completion: str, answer: str) -> float:
    """Process reward, verifiable from the prompt: 1.0 if the working line restates the question
    exactly as the answer format teaches ("23 + 58 = ..." or "a c z -> ..."), else 0.0. Copying the
    operands is a skill a small model can climb before it gets the answers right."""
    first_line = completion.strip().split("\n", 1)[0]
    arithmetic = _ARITHMETIC_PROMPT.match(prompt.strip())
    if arithmetic:
        return 1.0 if first_line.startswith(f"{arithmetic.group(1)} = ") else 0.0
    letters = _LETTER_PROMPT.search(prompt.strip())
    if letters:
        return 1.0 if first_line.startswith(f"{' '.join(letters.group(1))} -> ") else 0.0
    return 0.0


_WORK_RESULT = re.compile(r"(?:=|->)\s*(.+)$")


def consistency_reward(prompt: str, completion: str, answer: str) -> float:
    """Process reward, verifiable without the answer: 1.0 if the tagged answer is the result the
    working line arrives at ("23 + 58 = 81" -> 81; "a c z -> z c a" -> zca), else 0.0."""
    extracted = extract_answer(completion)
    result = _WORK_RESULT.search(completion.strip().split("\n", 1)[0])
    if extracted is None or result is None:
        return 0.0
    worked = result.group(1).strip()
    worked = worked.replace(" ", "") if "->" in completion.split("\n", 1)[0] else worked
    return 1.0 if worked and worked == extracted else 0.0


REWARDS: dict[str, Reward] = {"correctness": correctness_reward, "similarity": similarity_reward,
                              "restate": restate_reward, "consistency": consistency_reward, "format": format_reward}


# ---------------------------------------------------------------- open-format answers (user datasets)

_BOXED = "\\boxed{"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
# "The answer is $\\frac{1}{2}$" / "\\(x+1\\)": math in delimiters (a price like "$5 and ... $3" is not: see _is_math)
_ANSWER_IS_LATEX = re.compile(r"answer\s*(?:is|:)\s*:?\s*(?:\$\$?([^$]{1,200}?)\$|\\\((.{1,200}?)\\\))", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces balanced); None if there is none."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _is_math(span: str) -> bool:
    """A $..$ span after "answer is" that is math: one token ("7", "x+y") or LaTeX / an equation."""
    return not re.search(r"\s", span.strip()) or re.search(r"[\\^{}=/]", span) is not None


def extract_final_answer(completion: str) -> str | None:
    """The final answer in the usual conventions, first that applies: the last <answer>...</answer>,
    the last \\boxed{...}, the last "The answer is N" / "answer: N" (N a number, or math in $..$ / \\(..\\)),
    else the last number; None if none."""
    for found in (extract_answer(completion), _last_boxed(completion)):
        if found:
            return found
    stated = [(m.start(), (m.group(1) or m.group(2)).strip()) for m in _ANSWER_IS_LATEX.finditer(completion)
              if _is_math(m.group(1) or m.group(2))]  # first: at the same place, "$2\\pi$" beats the number 2
    stated += [(m.start(), m.group(1)) for m in _ANSWER_IS.finditer(completion)]
    if stated:
        return max(stated, key=lambda found: found[0])[1]
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def reference_answer(answer: str) -> str:
    """A dataset's answer field -> the answer itself: GSM8K-style "...#### 72" keeps what follows ####."""
    return answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer.strip()


def answers_match(extracted: str | None, answer: str) -> bool:
    """The extracted final answer equals the dataset's answer: as math with math-verify (1,234 == 1234.0,
    \\frac{1}{2} == 0.5, x = 5 == 5, "12 apples" == 12), or as case-insensitive text for a word answer
    ("Paris") or one math-verify cannot parse (trainer.rl.math_answers.answers_equivalent)."""
    return answers_equivalent(extracted, reference_answer(answer))


def open_correctness_reward(prompt: str, completion: str, answer: str) -> float:
    """`correctness` on user datasets: 1.0 if extract_final_answer(completion) matches `answer`, else 0.0."""
    return 1.0 if answers_match(extract_final_answer(completion), answer) else 0.0


def open_similarity_reward(prompt: str, completion: str, answer: str) -> float:
    """`similarity` on user datasets: edit-distance credit on extract_final_answer (1.0 when answers_match)."""
    extracted = extract_final_answer(completion)
    if extracted is None:
        return 0.0
    if answers_match(extracted, answer):
        return 1.0
    target = reference_answer(answer)
    return 1.0 - _edit_distance(extracted, target) / max(len(extracted), len(target), 1)


# what `correctness` and `similarity` mean when the prompts come from a user dataset (data.source)
OPEN_ANSWER_REWARDS: dict[str, Reward] = {"correctness": open_correctness_reward,
                                          "similarity": open_similarity_reward}


def _import_object(path: str):
    """"pkg.mod:attr.sub" or "pkg.mod.attr" -> the object."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"reward {path!r} is not a dotted path: use 'pkg.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({err})") from err
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward {path!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    return obj


def resolve_reward(spec: str | Reward) -> Reward:
    """A reward from a config value: a built-in name ("correctness", "format"), an importable dotted
    path ("pkg.mod:fn" or "pkg.mod.fn"), or a callable (returned as is)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward spec must be a name, a 'pkg.module:function' path or a callable; got {spec!r}")
    if spec in REWARDS:
        return REWARDS[spec]
    if "." not in spec and ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}; built-ins: {', '.join(REWARDS)}, "
                         "or give an importable 'pkg.module:function'")
    reward = _import_object(spec)
    if not callable(reward):
        raise ValueError(f"reward {spec!r} resolved to a non-callable {type(reward).__name__}")
    return reward


# ---------------------------------------------------------------- batched rewards


def is_batched(fn) -> bool:
    """A batched reward takes **columns: fn(prompts, completions, **columns) -> list[float]."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _is_per_sample(fn) -> bool:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind("prompt", "completion", "answer")
        return True
    except TypeError:
        return False


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def as_batched(fn: Reward | BatchedReward) -> BatchedReward:
    """A reward as fn(prompts, completions, **columns) -> list[float]: batched ones (with **columns) as they
    are; per-sample (prompt, completion, answer) -> float ones adapted, reading columns["answer"]."""
    if is_batched(fn):
        return fn
    if not _is_per_sample(fn):
        raise ValueError(f"reward {_name(fn)} takes neither (prompts, completions, **columns) (batched: every "
                         "dataset column as a keyword list) nor (prompt, completion, answer) (per sample): "
                         "change its signature to one of them")

    def batched(prompts, completions, **columns):
        if "answer" not in columns:
            raise ValueError(f"reward {_name(fn)} is per-sample (prompt, completion, answer) but the prompts have "
                             f"no `answer` column (columns: {', '.join(sorted(columns)) or 'none'}): add one to the "
                             "dataset, or make the reward batched: fn(prompts, completions, **columns)")
        return [float(fn(p, c, a)) for p, c, a in zip(prompts, completions, columns["answer"])]

    batched.__qualname__ = f"batched({_name(fn)})"
    return batched


def resolve_batched_reward(spec: str | Reward | BatchedReward, *, open_answers: bool = False) -> BatchedReward:
    """resolve_reward, then as_batched. open_answers (prompts from a user dataset): the built-in
    `correctness` and `similarity` read extract_final_answer instead of the <answer> tag only."""
    if open_answers and isinstance(spec, str) and spec in OPEN_ANSWER_REWARDS:
        return as_batched(OPEN_ANSWER_REWARDS[spec])
    return as_batched(resolve_reward(spec))


def score(rewards: Sequence[BatchedReward], prompts: list[str], completions: list[str], columns: dict) -> list[list[float]]:
    """[reward][completion] scores; each reward must return one float per completion."""
    out = []
    for fn in rewards:
        values = list(fn(prompts, completions, **columns))
        if len(values) != len(completions):
            raise ValueError(f"reward {_name(fn)} returned {len(values)} scores for {len(completions)} completions: "
                             "return one float per completion")
        out.append([float(v) for v in values])
    return out

"""Math-aware answer checking for prompt datasets (data.source != builtin), with HF's math-verify
(https://github.com/huggingface/Math-Verify, the checker TRL's and open-r1's accuracy rewards use).

    answers_equivalent(prediction, gold) -> bool
        prediction: the final answer already taken from a completion (trainer.rl.tasks.extract_final_answer:
                    the <answer> tag, else the last \\boxed{}, else "The answer is ...", else the last number)
        gold:       the dataset's answer (GSM8K's "... #### 72" is cut to "72" by tasks.reference_answer first)

Accepted as equal (math-verify parses both sides to SymPy and compares them; strings that are equal after
normalise_text always count):
    numbers in any notation       0.5 == 1/2 == \\frac{1}{2} == \\dfrac12;  1,000 == 1000;  12.0 == 12;  \\$5 == 5
    LaTeX expressions             2\\pi, \\sqrt{2}, 10^{3}, x^2+2x+1 vs (x+1)^2 (symbolic equality), sets, intervals
    an assignment for its value   x = 3 (or \\boxed{x=3}) == 3
    trailing units / text         5 apples, 3\\text{ cm}, "The answer is 133." == the number
    prose around a number         "so 12 in all" == 12 (math-verify's own extraction finds the number)
Refused: other values (134 vs 133, 0.333 vs 1/3: math-verify compares numbers to 6 decimals), lists vs a single
value ("3, 4" vs 4), and predictions that would take sympy forever to evaluate (see _too_big). Percent: a plain 50% on
either side matches 50 and 0.5; LaTeX 50\\% is read as 50 only. Units in the gold answer stay: "5 m/s" != 5.
Word answers: when the gold answer is a word or phrase ("Paris", "B", "yes"), or math-verify parses nothing from
it, the check is the old case-insensitive string comparison (normalise_text: \\text{}, $ and a final period dropped).

Timeouts: math-verify bounds parse() and verify() with signal.alarm (5 s), which only works in the main thread;
from any other thread it raises ValueError ("Math-Verify doesn't support threaded environment ...") with its
defaults. cptrain's async GRPO (rollout.max_off_policy_steps >= 1) scores rollouts in a producer thread, so off
the main thread the signal timeout is disabled (parsing_timeout=None, timeout_seconds=None; math-verify's
"Timeout is disabled" warning is filtered out) and _too_big refuses, before verify(), the parsed predictions that
made it hang in our tests: huge powers (10^{10^{10}}, (x+1)^{1000}), factorials / Gamma / binomials of huge
numbers, sums and products over huge ranges. In the main thread both guards apply. The guard is a heuristic, not
a timeout: an expression it misses could still stall the producer thread.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading

TIMEOUT_S = 5  # math-verify's signal timeout per parse / comparison (main thread only)
MAX_ANSWER_CHARS = 1000  # a longer "final answer" is not parsed as math (string comparison only)
MAX_DIGITS = 10_000  # refuse a prediction whose numbers could exceed this many digits (sympy may never finish)
MAX_SYMBOLIC_POWER = 100  # refuse (x+1)^{n} for n above this: verify() expands it (n=1000: 6 s; 200: 1 s)
MAX_RANGE = 10_000  # refuse sums / products over more terms than this

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORDS = re.compile(r"[^\W\d_]+(?:[\s'-]+[^\W\d_]+)*")  # a word or phrase: letters only, no digits or math
_PROSE_WORD = re.compile(r"(?<![^\s(])[^\W\d_]{2,}(?![^\W\d_])")  # a standalone word of 2+ letters
_DELIMITED = ("$", "\\boxed", "\\(", "\\[")


def normalise_text(text: str) -> str:
    """Lower case, \\text{..}-style wrappers and $ dropped, whitespace collapsed, no final period."""
    text = _TEXT_WRAPPER.sub(r"\1", text).replace("$", "")
    return " ".join(text.split()).rstrip(".").strip().lower()


def is_word_answer(gold: str) -> bool:
    """"Paris", "New York", "B", "yes": letters only (after normalise_text), so compared as text, not as math."""
    return _WORDS.fullmatch(normalise_text(gold)) is not None


def _timeout() -> int | None:
    """math-verify's timeout here: signal.alarm only works in the main thread (elsewhere: None, no timeout, and
    _too_big is the guard: math-verify's "Timeout is disabled" warning, printed once per racing thread, is
    dropped)."""
    if threading.current_thread() is threading.main_thread():
        return TIMEOUT_S
    _quiet_timeout_warning()
    return None


@functools.cache
def _quiet_timeout_warning() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())


def _looks_like_prose(text: str) -> bool:
    """A standalone word of 2+ letters outside LaTeX commands and \\text{..}: "12 apples", "x is 3"."""
    bare = _LATEX_COMMAND.sub(" ", re.sub(r"\\(?:text|mbox|mathrm|textrm)\s*\{[^{}]*\}", " ", text))
    return _PROSE_WORD.search(bare) is not None


def parse_math(text: str) -> list:
    """math-verify's parse of one answer ([] if nothing parses). Bare LaTeX ("\\frac12", "2\\pi", "x=3") is parsed
    inside $..$ (plain parse misses \\sqrt{2} and reads "2\\pi" as 2); prose ("so 12 in all") with math-verify's own
    extraction first, since inside $..$ its words would become a product of symbols."""
    from math_verify import parse

    text = text.strip()
    if not text or len(text) > MAX_ANSWER_CHARS:
        return []
    timeout = _timeout()
    if any(d in text.replace("\\$", "") for d in _DELIMITED):  # \$5 is a price, not a delimiter
        return parse(text, parsing_timeout=timeout)
    attempts = (text, f"${text}$") if _looks_like_prose(text) else (f"${text}$", text)
    for attempt in attempts:
        parsed = parse(attempt, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """The gold answer parsed (cached: every completion of a group shares it); () for a word answer."""
    if is_word_answer(gold):
        return ()
    return tuple(parse_math(gold))


def _log10_bound(e) -> float:
    """An upper bound on log10 |value| (about the number of digits) of a parsed expression; inf where it could be
    astronomically large or too slow for sympy. Symbols count as small."""
    import sympy

    if isinstance(e, sympy.MatrixBase):
        return max((_log10_bound(x) for x in e), default=0.0)
    if not isinstance(e, sympy.Basic):
        return 0.0
    if isinstance(e, sympy.Rational):  # Integer included
        return math.log10(max(abs(e.p), e.q) + 1)
    if isinstance(e, sympy.Float):
        try:
            return math.log10(abs(float(e)) + 1)
        except OverflowError:
            return math.inf
    if isinstance(e, sympy.Pow):
        base = _log10_bound(e.args[0])
        if isinstance(e.args[1], sympy.Rational):
            power = float(abs(e.args[1]))  # OverflowError for a huge one: _too_big refuses
        else:
            exponent = _log10_bound(e.args[1])
            if exponent > 9:
                return math.inf
            power = 10.0 ** exponent  # bounds |exponent|
        if e.args[0].free_symbols and power > MAX_SYMBOLIC_POWER:
            return math.inf
        return power * max(base, 1.0)
    if isinstance(e, (sympy.Sum, sympy.Product)):
        limits = max((_log10_bound(x) for lim in e.limits for x in lim[1:]), default=0.0)
        if limits > math.log10(MAX_RANGE + 1):
            return math.inf
        return 10.0 ** limits * max(_log10_bound(e.function), 1.0)
    if isinstance(e, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma, sympy.binomial,
                      sympy.RisingFactorial, sympy.FallingFactorial)):
        n = max(_log10_bound(a) for a in e.args)
        return math.inf if n > 6 else 10.0 ** n * max(n, 1.0)
    args = [_log10_bound(a) for a in e.args]
    if isinstance(e, sympy.Mul):
        return sum(args)
    return max(args, default=0.0) + (1.0 if isinstance(e, sympy.Add) else 0.0)


def _too_big(parsed) -> bool:
    """True for a parsed prediction that sympy may not finish comparing (digits above MAX_DIGITS, a symbolic power
    above MAX_SYMBOLIC_POWER, a sum / product over more than MAX_RANGE terms): it is refused unchecked."""
    try:
        return _log10_bound(parsed) > MAX_DIGITS
    except (RecursionError, ValueError, TypeError, OverflowError):
        return True


def answers_equivalent(prediction: str | None, gold: str) -> bool:
    """True if `prediction` (an extracted final answer) equals `gold`: as math (math-verify), or, for a word gold
    answer or one math-verify cannot parse, as normalised text."""
    if prediction is None or not prediction.strip():
        return False
    if normalise_text(prediction) == normalise_text(gold):
        return True
    gold_parsed = parse_gold(gold.strip())
    if not gold_parsed:
        return False  # a word answer (or unparseable): the text comparison above was the check
    predicted = parse_math(prediction)  # [sympy value, matched text] as math-verify returns it
    if not predicted or any(_too_big(p) for p in predicted if not isinstance(p, str)):
        return False
    from math_verify import verify

    return verify(list(gold_parsed), predicted, timeout_seconds=_timeout())

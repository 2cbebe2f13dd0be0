"""Calculator environment: arithmetic too large for a small model's head, and a calculator tool to do it with.

    CalculatorEnv.make_rows(n, seed) ─> [{"prompt": "What is 437 * 2891?", "answer": "1263367", "task": "calculator"}]
        multiply (3 digits x 3-4 digits), sum (4-6 numbers of 3 digits), mixed (2 digits x 3 digits - 3 digits)
    reset(row) ─> [system: instructions (+ the tool list), user: the question]
    model: <tool_call>{"name": "calculate", "arguments": {"expression": "437 * 2891"}}</tool_call>
      ─ step ─> [{"role": "tool", "name": "calculate", "content": "1263367"}]
    model: <answer>1263367</answer> ─ step ─> ([], done)
    reward ─> {"correct": 1.0 when the final <answer> is the answer, "used_tool": 1.0 when a calculate call succeeded}

calculate() walks the expression's `ast` and accepts only integers, + - * / and parentheses: no names, calls,
attributes or powers, so nothing but arithmetic is ever evaluated (no eval). Division is exact (fractions).
"""

from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction

from trainer.rl.envs.tools import ToolEnv, final_answer

MAX_EXPRESSION_CHARS = 200
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_ALLOWED = "integers, + - * / and parentheses"


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    shown = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
    raise ValueError(f"only {_ALLOWED} are allowed, not {shown!r}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: Integers combined with + - * / and parentheses, e.g. "(12 + 30) * 7 / 2".

    Returns:
        The value: an integer, or a decimal when the division is not exact.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError) as err:
        raise ValueError(f"not an arithmetic expression ({type(err).__name__}); use {_ALLOWED}") from None
    value = _evaluate(tree)
    return str(value.numerator) if value.denominator == 1 else str(round(float(value), 10))


def _multiply(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(100, 999), rng.randint(100, 9999)
    return f"{a} * {b}", a * b


def _sum(rng: random.Random) -> tuple[str, int]:
    terms = [rng.randint(100, 999) for _ in range(rng.randint(4, 6))]
    return " + ".join(map(str, terms)), sum(terms)


def _mixed(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(10, 99), rng.randint(100, 999), rng.randint(100, 999)
    return f"{a} * {b} - {c}", a * b - c  # >= 10 * 100 - 999 > 0


PROBLEMS = (_multiply, _sum, _mixed)


class CalculatorEnv(ToolEnv):
    """Multi-digit arithmetic with a `calculate` tool (env args: timeout_s, tokenizer, system_in_prompt)."""

    instructions = ("Solve the arithmetic task. Use the calculate tool instead of computing in your head, then give "
                    "the final answer as <answer>...</answer>.")

    def __init__(self, timeout_s: float = 5.0, tokenizer=None, system_in_prompt: bool | None = False):
        super().__init__([calculate], timeout_s=timeout_s, tokenizer=tokenizer, system_in_prompt=system_in_prompt)

    @classmethod
    def make_rows(cls, n: int, seed: int) -> list[dict]:
        """n questions, the same for the same seed (train and eval use different seeds)."""
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            expression, value = rng.choice(PROBLEMS)(rng)
            rows.append({"prompt": f"What is {expression}?", "answer": str(value), "task": "calculator"})
        return rows

    def reward(self, messages: list[dict], row: dict) -> dict[str, float]:
        """correct: the final <answer> equals the answer (the score that matters); used_tool: a calculate call
        returned a result during the episode (a 0/1 signal to log or weight lightly)."""
        used = any(m.get("role") == "tool" and m.get("name") == "calculate"
                   and not str(m.get("content", "")).startswith("Error:") for m in messages)
        correct = final_answer(messages) == str(row["answer"]).strip()
        return {"correct": float(correct), "used_tool": float(used)}

"""Regenerate the bundled assets (tokenizer, SFT data, eval prompts), deterministically:

    python scripts/make_assets.py            # writes trainer/data/assets/
    python scripts/make_assets.py --check    # regenerates into a temp dir and compares with trainer/data/assets/

    trainer.rl.tasks ──make_examples(seed)──> task rows ─┬─> assets/sft_tasks.jsonl   (chat rows)
                                                      ├─> assets/eval_tasks.jsonl  (prompts not in the SFT rows)
    generated generic sentences ──────────────────────┴─> BPE training ─> assets/tokenizer/
    small arithmetic (a + b, a - b up to 20, a * b up to 12 x 12) ─> assets/small_arith.jsonl: GRPO prompts for a
        real small model (configs/data/small_arith.yaml; SmolLM2-135M-Instruct answers ~28% greedily)

The tokenizer is byte-level BPE (every string encodes, nothing is unknown) with digits split one
per token (arithmetic stays learnable by a tiny model), ChatML special tokens and a chat template
whose assistant turns sit inside {% generation %} so transformers returns an assistant mask.
Needs only `tokenizers` and `transformers` (no network).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.data.records import tool_use_sft_rows  # noqa: E402
from trainer.rl.tasks import TASKS, make_examples, task_messages  # noqa: E402

ASSETS = REPO / "trainer" / "data" / "assets"
VOCAB_SIZE = 512
SFT_ROWS, SFT_SEED = 4000, 1234
EVAL_ROWS_PER_TASK, EVAL_SEED = 64, 98765
EVAL_TASKS = ("add", "sub", "mul", "reverse", "sort")
GENERIC_SENTENCES, GENERIC_SEED = 3000, 7
SMALL_ARITH_SEED = 2468

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|pad|>"

# ChatML; loss goes on the assistant content and its <|im_end|> (inside {% generation %}).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SUBJECTS = ["the model", "a student", "the teacher", "my friend", "the small robot", "a careful reader",
             "the program", "our team", "the old clock", "a curious cat", "the river", "each number"]
_VERBS = ["reads", "writes", "counts", "checks", "finds", "sorts", "adds", "learns", "answers", "moves",
          "keeps", "shows", "builds", "solves", "follows", "repeats"]
_OBJECTS = ["the letters", "a short word", "the answer", "every question", "the list", "two numbers",
            "the last line", "a simple sum", "the result", "each step", "the message", "a new idea"]
_ENDINGS = ["today", "again", "with care", "before lunch", "in order", "one by one", "very quickly",
            "without help", "at the end", "for the test", "in the morning", "step by step"]
_QUESTIONS = ["What is the answer?", "Can you check the sum?", "Which letter comes first?",
              "How many words are there?", "Is the result correct?", "Why does the order matter?"]


def generic_sentence(rng: random.Random) -> str:
    """One sentence of simple English (plus a number now and then) for the tokenizer's training text."""
    kind = rng.random()
    if kind < 0.6:
        return (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                f"{rng.choice(_ENDINGS)}.")
    if kind < 0.8:
        return rng.choice(_QUESTIONS)
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"There are {a} apples and {b} pears, so {a + b} pieces of fruit in total."


def generic_text(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [generic_sentence(rng) for _ in range(n)]


def sft_rows(task: str, n: int, seed: int) -> list[dict]:
    """Chat rows for SFT: system + user question + assistant (working line and answer tag)."""
    return [{"messages": task_messages(ex["prompt"], ex["completion"])} for ex in make_examples(task, n, seed)]


def eval_rows(per_task: int, seed: int, exclude_prompts: set[str]) -> list[dict]:
    """Eval prompts, `per_task` of each task, none of them in the SFT data."""
    rows = []
    for offset, task in enumerate(EVAL_TASKS):
        for ex in make_examples(task, per_task, seed + offset, exclude_prompts=exclude_prompts):
            rows.append({"task": ex["task"], "prompt": ex["prompt"], "answer": ex["answer"],
                         "messages": task_messages(ex["prompt"], ex["completion"])})
    return rows


def small_arith_rows(seed: int) -> list[dict]:
    """Every distinct prompt "What is a + b?" (a, b in 0-20: 441), "a - b" (0 <= b <= a <= 20: 231) and "a * b"
    (a, b in 1-12: 144), shuffled: RL prompts with numeric answers (rewarded by the final number). Distinct, so
    the last rows held out for eval (rollout.eval_prompts) are never trained on. SmolLM2-135M-Instruct, greedy:
    ~28% right (it often talks past the answer); sampled at T=0.7, 4 tries find the answer for ~40-80%."""
    rows = [(a, "+", b, a + b) for a in range(21) for b in range(21)]
    rows += [(a, "-", b, a - b) for a in range(21) for b in range(a + 1)]
    rows += [(a, "*", b, a * b) for a in range(1, 13) for b in range(1, 13)]
    random.Random(seed).shuffle(rows)
    return [{"prompt": f"What is {a} {op} {b}?", "answer": str(result), "op": op} for a, op, b, result in rows]


def chatml_texts(rows: list[dict]) -> list[str]:
    """The rows as ChatML text, the way the template renders them (for tokenizer training)."""
    return ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"]) for row in rows]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE, digits split one per token, ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_hf_tokenizer(tokenizer, out_dir: Path) -> None:
    """Wrap in transformers' fast tokenizer (special tokens, chat template) and save it."""
    from transformers import PreTrainedTokenizerFast

    others = [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)]
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 additional_special_tokens=others,
                                 model_max_length=1 << 20, padding_side="right", clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_assets(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sft = sft_rows("mixed", SFT_ROWS, SFT_SEED)
    train_prompts = {row["messages"][1]["content"] for row in sft}
    evals = eval_rows(EVAL_ROWS_PER_TASK, EVAL_SEED, train_prompts)
    write_jsonl(sft, out / "sft_tasks.jsonl")
    write_jsonl(evals, out / "eval_tasks.jsonl")
    write_jsonl(small_arith_rows(SMALL_ARITH_SEED), out / "small_arith.jsonl")
    write_jsonl(tool_use_sft_rows(), out / "tool_use_sft.jsonl")  # SFT on tool calls (trainer/data/records.py)
    # the tokenizer sees the chat text of all tasks, not only the mixture's sample
    extra = [row for task in TASKS for row in sft_rows(task, 200, GENERIC_SEED)]
    texts = chatml_texts(sft + extra) + generic_text(GENERIC_SENTENCES, GENERIC_SEED)
    save_hf_tokenizer(train_tokenizer(texts, VOCAB_SIZE), out / "tokenizer")


def differing_files(a: Path, b: Path) -> list[str]:
    names = sorted({p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
                   | {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()})
    same = [n for n in names if (a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False)]
    return [n for n in names if n not in same]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="output directory (default: trainer/data/assets)")
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            make_assets(Path(tmp))
            diff = differing_files(Path(tmp), args.out)
        if diff:
            sys.exit(f"assets differ from a fresh generation: {', '.join(diff)}")
        print(f"{args.out}: up to date")
        return
    make_assets(args.out)
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

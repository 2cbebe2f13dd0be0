"""Peer benchmark: TRL's GRPOTrainer on cptrain's smollm2_arith task, per-step wall time and tokens/s.

Runs with the TRL venv's python (scripts/install_trl_peer.sh), single process, CPU, no vLLM: TRL's own
`transformers` generation, what a TRL user without vLLM gets.

    .venv-trl/bin/python scripts/bench/rollout/trl_peer.py --model pretrained/smollm2-135m-instruct \
        --data trainer/data/assets/small_arith.jsonl --steps 2 --out outputs/bench/trl_peer.json

Same model, prompts and settings as `trainer.rl experiment=smollm2_arith` (configs/experiment/smollm2_arith.yaml):

    cptrain                                   GRPOConfig / what this script does
    prompts: data rows but the last 100       train dataset = rows[:-100] (--held-out), shuffled (seed 0)
    chat template, one user turn              conversational prompts [{"role": "user", "content": prompt}]: TRL
                                              applies the tokenizer's template (its default system prompt) with
                                              the generation prompt, as cptrain does
    prompts_per_step 8, group_size 8          num_generations=8; generation_batch_size = 8 x 8 = 64 completions,
                                              generated in ONE model.generate call; per_device_train_batch_size
                                              --micro-batch (8 completions) x gradient_accumulation_steps 8 =
                                              steps_per_generation 8 -> one optimizer step per 64 rollouts
    max_new_tokens 48, T 0.7, top_p 1         max_completion_length=48, temperature=0.7, top_p=1.0, top_k=0
                                              (TRL divides the training logits by T too, as cptrain does)
    reward correctness, weight 1              one reward function: trainer.rl.tasks.open_correctness_reward
                                              (final answer of the completion == answer), 1.0 / 0.0
    group advantages, std-scaled              scale_rewards="group" (TRL: (r - mean) / (std + 1e-4);
                                              cptrain: / (std + 1e-6); both the unbiased std)
    loss.type grpo, normalization token       loss_type="dapo": sum of token losses over the completion tokens
                                              of the whole 64-completion step. NOT TRL's "grpo", which is
                                              cptrain's normalization=sequence (mean per sequence, then over
                                              sequences). Clip 1-0.2 / 1+0.28: epsilon=0.2, epsilon_high=0.28
    num_iterations 1, kl_coef 0               num_iterations=1, beta=0.0 (no reference model is built)
    AdamW lr 1e-5, betas (0.9, 0.95), eps     the same torch AdamW, weight_decay 0, passed to the trainer with
      1e-8, wd 0, constant after 2 warmup     cptrain's LambdaLR (trainer/optim.py: lr x (step+1)/2 for steps
                                              0, 1, then lr). HF's constant_with_warmup would start at lr 0 (lr x
                                              step/2), one step behind cptrain; GRPOConfig still names
                                              lr_scheduler_type=constant_with_warmup, warmup_steps=2 for the record,
                                              but the trainer uses the scheduler passed in
    grad_clip 1.0, fp32, no activation ckpt   max_grad_norm=1.0, bf16=False, fp16=False, fp32 weights,
                                              gradient_checkpointing=False (TRL defaults to True and to bf16)
    attn sdpa                                 attn_implementation="sdpa"

Differences that remain, and matter when comparing numbers:
  * Importance ratio: cptrain (rollout.old_logprobs=engine) divides by the log-probs its rollout engine
    recorded while sampling; TRL, with steps_per_generation == gradient_accumulation_steps and one
    iteration, takes the ratio against the detached training forward (exactly 1) and computes no old
    log-probs at all: no extra forward pass on either side.
  * Layout: cptrain runs cp=2 Ulysses over 2 ranks (torchrun: one thread per rank, token-budget
    micro-batches of packed rollouts, 2048 tokens/rank); TRL runs one process on --threads threads (default
    torch's, all cores; torch.get_num_threads() is in the JSON), micro-batches of --micro-batch padded rows.
  * Generation: both are transformers' model.generate on left-padded prompts with a KV cache; TRL
    generates all 64 completions in one call and stops a row at eos (<|im_end|>); the eos token counts as a
    completion token (it is in the loss mask) on both sides.
  * TRL's `mask_truncated_completions` stays False (cptrain keeps truncated completions in the loss too).

Timing: `step_s` is on_step_begin -> on_step_end of the optimizer step (rollout, reward, 8 micro-batch
forward+backward, clip, AdamW step). `rollout_s` is TRL's `_generate_and_score_completions` (generation,
tokenisation, reward, advantages); `generate_s` is `_generate_single_turn` alone (the model.generate call and
its padding), measured by overriding those two methods in a subclass that calls the originals; `train_s` =
step_s - rollout_s. TRL's own per-step `step_time` metric (sum of its training_step calls, optimizer step
excluded) is copied as `trl_step_time_s`. Token counts exclude padding: completion tokens are the
generated tokens up to and including eos, total = prompt + completion tokens of the 64 rollouts;
tokens_per_s = total_tokens / step_s, and generate_tokens_per_s = completion_tokens / generate_s.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

REPO = Path(__file__).resolve().parents[3]


def correctness_reward_fn():
    """cptrain's `correctness` for dataset prompts (and where it came from): the repo's own function when it
    imports in this venv, else the same rule here (the final number of the completion equals the answer)."""
    sys.path.insert(0, str(REPO))
    try:
        from trainer.rl.tasks import open_correctness_reward
        return open_correctness_reward, "trainer.rl.tasks.open_correctness_reward"
    except Exception as error:  # noqa: BLE001 - any import failure: fall back, say so in the JSON
        number = re.compile(r"-?\d+(?:\.\d+)?")

        def last_number_matches(prompt: str, completion: str, answer: str) -> float:
            found = number.findall(completion.replace(",", ""))
            return 1.0 if found and float(found[-1]) == float(answer) else 0.0
        return last_number_matches, f"last number == answer (trainer.rl.tasks failed to import: {error!r})"


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records, per rollout batch, its generation and rollout time and unpadded token counts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts: list[dict] = []
        self._generate_s = 0.0

    def _generate_single_turn(self, *args, **kwargs):
        start = time.perf_counter()
        out = super()._generate_single_turn(*args, **kwargs)
        self._generate_s += time.perf_counter() - start
        return out

    def _generate_and_score_completions(self, inputs):
        self._generate_s, start = 0.0, time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            completion_tokens = int(out["completion_mask"].sum())
            self.rollouts.append({"rollout_s": time.perf_counter() - start, "generate_s": self._generate_s,
                                  "sequences": int(out["completion_mask"].size(0)),
                                  "prompt_tokens": int(out["prompt_mask"].sum()),
                                  "completion_tokens": completion_tokens})
        return out


class StepRecorder(TrainerCallback):
    """Wall time of each optimizer step and the trainer's log line for it."""

    def __init__(self):
        self.step_s: list[float] = []
        self.logs: dict[int, dict] = {}
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_s.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.logs[state.global_step] = dict(logs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "pretrained/smollm2-135m-instruct"))
    p.add_argument("--data", default=str(REPO / "trainer/data/assets/small_arith.jsonl"))
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward+backward (divides the step's)")
    p.add_argument("--held-out", type=int, default=100, help="last rows never trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    completions_per_step = a.prompts_per_step * a.group_size
    if completions_per_step % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide prompts_per_step x group_size = {completions_per_step}")
    accum = completions_per_step // a.micro_batch

    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    train_rows = rows[:-a.held_out] if a.held_out else rows
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])}
                                 for r in train_rows])
    reward, reward_source = correctness_reward_fn()

    def correctness(prompts, completions, answer, **_):
        return [reward(p[-1]["content"], c[-1]["content"], ans) for p, c, ans in zip(prompts, completions, answer)]

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    warmup = a.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # trainer/optim.py lr_factor, schedule=constant
        optimizer, lambda step: (step + 1) / warmup if warmup and step < warmup else 1.0)

    out_dir = tempfile.mkdtemp(prefix="trl_peer_")
    config = GRPOConfig(
        output_dir=out_dir, max_steps=a.steps, seed=a.seed, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=accum, steps_per_generation=accum,
        num_generations=a.group_size, num_iterations=1, max_completion_length=a.max_new_tokens,
        temperature=a.temperature, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group",
        epsilon=0.2, epsilon_high=0.28, mask_truncated_completions=False, learning_rate=a.lr,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
        lr_scheduler_type="constant_with_warmup", warmup_steps=warmup, max_grad_norm=1.0,
    )
    assert config.generation_batch_size == completions_per_step, config.generation_batch_size
    recorder = StepRecorder()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[correctness], args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[recorder], optimizers=(optimizer, scheduler))
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing of the run's is kept there
    total_s = time.perf_counter() - start
    if len(trainer.rollouts) != len(recorder.step_s):
        raise RuntimeError(f"{len(trainer.rollouts)} rollout batches for {len(recorder.step_s)} optimizer steps: "
                           "expected one generation per step")

    steps = []
    for i, (step_s, roll) in enumerate(zip(recorder.step_s, trainer.rollouts, strict=True), start=1):
        log = recorder.logs.get(i, {})
        total_tokens = roll["prompt_tokens"] + roll["completion_tokens"]
        steps.append({
            "step": i, "step_s": round(step_s, 3), "rollout_s": round(roll["rollout_s"], 3),
            "generate_s": round(roll["generate_s"], 3), "train_s": round(step_s - roll["rollout_s"], 3),
            "trl_step_time_s": log.get("step_time"), "sequences": roll["sequences"],
            "prompt_tokens": roll["prompt_tokens"], "completion_tokens": roll["completion_tokens"],
            "total_tokens": total_tokens, "tokens_per_s": round(total_tokens / step_s, 1),
            "generate_tokens_per_s": round(roll["completion_tokens"] / roll["generate_s"], 1),
            "reward_mean": log.get("reward"), "reward_std": log.get("reward_std"),
            "completion_mean_length": log.get("completions/mean_length"),
            "clipped_ratio": log.get("completions/clipped_ratio"), "learning_rate": log.get("learning_rate"),
            "grad_norm": log.get("grad_norm"), "loss": log.get("loss"),
        })
    timed = steps[1:] or steps  # the first step also pays one-off warm-up costs
    summary = {
        "steps": len(steps), "total_s": round(total_s, 2),
        "mean_step_s_excl_first": round(sum(s["step_s"] for s in timed) / len(timed), 3),
        "tokens_per_s_excl_first": round(sum(s["total_tokens"] for s in timed) / sum(s["step_s"] for s in timed), 1),
        "generate_share_excl_first": round(sum(s["generate_s"] for s in timed) / sum(s["step_s"] for s in timed), 3),
        "reward_mean": round(sum(s["reward_mean"] or 0.0 for s in steps) / len(steps), 4),
    }
    result = {
        "peer": "trl.GRPOTrainer", "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "machine": platform.machine(), "model": str(a.model),
        "data": str(a.data), "train_prompts": len(train_rows),
        "reward": reward_source, "generation": "transformers model.generate (TRL's default path, no vLLM)",
        "settings": {"prompts_per_step": a.prompts_per_step, "group_size": a.group_size,
                     "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": 1.0, "lr": a.lr,
                     "warmup_steps": warmup, "schedule": "constant after linear warmup, cptrain's lr_factor",
                     "micro_batch": a.micro_batch, "gradient_accumulation_steps": accum, "seed": a.seed},
        "grpo_config": {k: getattr(config, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "generation_batch_size", "num_generations", "num_iterations", "max_completion_length", "temperature",
            "top_p", "top_k", "beta", "loss_type", "scale_rewards", "epsilon", "epsilon_high",
            "importance_sampling_level", "mask_truncated_completions", "learning_rate", "adam_beta1", "adam_beta2",
            "adam_epsilon", "weight_decay", "max_grad_norm", "bf16", "fp16", "gradient_checkpointing", "use_cpu")},
        "timing_notes": "step_s: optimizer step wall time; rollout_s: _generate_and_score_completions; "
                        "generate_s: _generate_single_turn (model.generate); train_s = step_s - rollout_s",
        "summary": summary, "per_step": steps,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Run logging: output_dir/metrics.jsonl (one JSON line per optimizer step), W&B, a rank-0 progress bar.

Only rank 0 writes. W&B runs offline by default (files under output_dir/wandb, sync later with
`wandb sync`); `wandb.mode=online` streams, `disabled` skips it. `log_every` N: W&B and the progress
bar's numbers get every N-th step (and the last); metrics.jsonl gets every step.

Resume: metrics.jsonl, samples.jsonl, eval.jsonl and rollouts.jsonl keep the lines of the steps up to the
checkpoint's and drop the rest; a line that does not parse (the torn last write of a crash) is dropped with a
warning, and the file is replaced atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trainer.run.runtime import write_atomic


def _step_of_line(line: str, path: Path, number: int) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        print(f"metrics: dropping unreadable line {number} of {path} (a write cut short by a crash?): {line[:80]!r}",
              file=sys.stderr)
        return None


def keep_steps_up_to(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` whose step is <= `step` (all gone for step 0), dropping unreadable ones."""
    lines = path.read_text().splitlines() if path.is_file() and step > 0 else []
    kept = [line for i, line in enumerate(lines, 1)
            if line.strip() and (s := _step_of_line(line, path, i)) is not None and s <= step]
    if path.is_file() or kept:
        write_atomic(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, cfg, *, rank: int, total_steps: int, start_step: int, job: str):
        self.rank, self.path = rank, Path(cfg.output_dir) / "metrics.jsonl"
        self.run, self.bar, self.history = None, None, []
        self.log_every, self.total_steps = max(1, int(cfg.get("log_every", 1))), total_steps
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.path, *(self.path.parent / f"{name}.jsonl" for name in ("samples", "eval", "rollouts"))):
            keep_steps_up_to(path, start_step)
        self.path.touch()
        if cfg.wandb.mode != "disabled":
            import wandb
            from omegaconf import OmegaConf
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or Path(cfg.output_dir).name,
                                  mode=cfg.wandb.mode, dir=str(Path(cfg.output_dir).resolve()), job_type=job,
                                  config=OmegaConf.to_container(cfg, resolve=True))
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, desc=job, dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **{k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.update(1)
        if step % self.log_every and step != self.total_steps:
            return
        if self.run is not None:
            self.run.log(metrics, step=step)
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "reward_mean", "lr") if k in metrics})

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table (e.g. sample completions) to W&B and to output_dir/<name>.jsonl."""
        if self.rank != 0:
            return
        with (self.path.parent / f"{name}.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, row))}) + "\n")
        if self.run is not None:
            import wandb
            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self, summary: str) -> None:
        if self.rank != 0:
            return
        self.bar.close()
        if self.run is not None:
            self.run.summary.update({"summary": summary})
            self.run.finish()
        print(summary, flush=True)

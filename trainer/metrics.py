"""Run logging: output_dir/metrics.jsonl (one JSON line per optimizer step), W&B, a rank-0 progress bar.

Only rank 0 writes. W&B runs offline by default (files under output_dir/wandb, sync later with
`wandb sync`); `wandb.mode=online` streams, `disabled` skips it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, cfg, *, rank: int, total_steps: int, start_step: int, job: str):
        self.rank, self.path = rank, Path(cfg.output_dir) / "metrics.jsonl"
        self.run, self.bar, self.history = None, None, []
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            self.path.write_text("")
        else:  # resumed: keep the lines of the steps already done, drop any written after the checkpoint
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)
        self.bar.update(1)
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

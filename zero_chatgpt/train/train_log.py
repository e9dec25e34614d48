"""What a training run reports: its log (console progress, logs/STAGE.jsonl, TensorBoard), the result the loop
returns, and the summary table a stage prints from it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from zero_chatgpt.core.console import info, table


class Logger:
    """logs/<stage>.jsonl (+ TensorBoard), rank 0 only. On resume, records after the resumed
    step are dropped so the log reads as one uninterrupted run."""

    def __init__(self, log_dir: Path, stage: str, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(log_dir) / f"{stage}.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass   # a line cut by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                self.tb = SummaryWriter(str(Path(log_dir) / "tb" / stage), purge_step=start_step)
            except Exception as e:   # tensorboard missing or broken: the jsonl log still has everything
                info(f"tensorboard logging off ({type(e).__name__}: {e})")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        if self.tb is not None:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


@dataclass
class TrainResult:
    step: int
    final: Path | None
    last_loss: float
    evals: list[dict]
    tokens: int
    seconds: float
    precision: str
    resumed_from: int
    selected_step: int = -1          # the step final/ holds when select_metric chose it (-1: the last)
    stopped: str | None = None       # why the run ended before max_steps, if it did
    selected_loss: float = float("nan")   # the training loss at selected_step

    @property
    def kept_eval(self) -> dict:
        """The evaluation of the weights final/ holds: the selected step's, else the last."""
        if self.selected_step >= 0:
            return next((e for e in reversed(self.evals) if e.get("step") == self.selected_step), {})
        return self.evals[-1] if self.evals else {}


def summary_rows(result: TrainResult) -> list[list]:
    """The summary of a training run; when a metric chose the kept step, its figures are that step's
    (what final/ holds), with the last step's loss beside them."""
    rows = [["steps", result.step], ["resumed from step", result.resumed_from]]
    if result.tokens:        # stages that count no tokens per step (RM, DPO, RL) leave the row out
        rows.append(["tokens", result.tokens])
    if result.selected_step >= 0:
        rows += [["final/ holds step (best evaluated)", result.selected_step],
                 [f"train loss at step {result.selected_step} (kept)", result.selected_loss],
                 [f"train loss at step {result.step} (last)", result.last_loss]]
    else:
        rows.append(["final train loss", result.last_loss])
    rows += [["precision", result.precision], ["time (s)", result.seconds]]
    if result.stopped:
        rows.append(["stopped early", result.stopped])
    kept = result.kept_eval
    for k, v in kept.items():
        if k != "step":
            rows.append([f"{k} (step {kept['step']})" if result.selected_step >= 0 else k, v])
    return rows


def print_summary(stage: str, result: TrainResult) -> None:
    table(["", stage], summary_rows(result), title=f"{stage}: done → {result.final}")

"""Metrics writers: one scalar record per step to JSONL, TensorBoard events, a one-line console
summary, a progress bar with ETA, and optional Weights & Biases.

Only scalars pass through here — never prompts or completions (those go to the 0600 audit log).

``metrics.jsonl`` survives a kill mid-write: :func:`truncate_metrics` (run before a resumed
run appends) drops a torn LAST line with a warning instead of failing, and rewrites the file
atomically (a temporary sibling renamed into place), so a second kill during the rewrite loses
nothing either. The file is created by the project and recorded as its own
(``fsutil.create_owned_file``); a ``metrics.jsonl`` it did not create is refused, never
rewritten.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping, Optional

from absl import logging

from advgame_jax import fsutil
from advgame_jax.errors import UserError

METRICS_KIND = "metrics"


def _finite_scalars(record: Mapping[str, float]) -> dict:
    out = {}
    for k, v in record.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        out[k] = f if math.isfinite(f) else None
    return out


class MetricsFileError(UserError, ValueError):
    """A ``metrics.jsonl`` line other than the last one is not a metrics record."""


def truncate_metrics(path: str, step: int) -> int:
    """Keep the records of ``path`` with ``"step" <= step`` (later ones were written by a run
    that died before its next checkpoint). Only the LAST line may be torn (a write cut short
    by a kill): it is dropped with one warning. Any other line that is not a metrics record
    raises :class:`MetricsFileError` naming it, and the file is left as it is; so does a
    ``metrics.jsonl`` the project did not create (``fsutil.require_owned_file``). Returns the
    number of torn lines dropped (0 or 1)."""
    if not fsutil.require_owned_file(path, METRICS_KIND, "config.workdir"):
        return 0
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    keep, torn, changed = [], 0, False
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            changed = True
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            record_step = record["step"]
            if not isinstance(record_step, int):
                raise TypeError
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            if i != last:
                raise MetricsFileError(
                    f"{path}:{i + 1}: not a metrics record (expected a JSON object with an "
                    f"integer 'step'); only a torn last line is repaired, so the file is "
                    f"left as it is: fix or remove that line, or use another workdir"
                ) from None
            torn, changed = 1, True
            logging.warning(
                "%s:%d is not a complete metrics record (a write cut short); dropped", path, i + 1
            )
            continue
        if record_step <= step:
            keep.append(line.decode("utf-8") + "\n")
        else:
            changed = True
    if changed or (raw and not raw.endswith(b"\n")):
        fsutil.atomic_write_text(path, "".join(keep), mode=0o600)
    return torn


class MetricsWriter:
    """Fan-out of per-step scalar records to the configured sinks (all in ``workdir``)."""

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        tensorboard: bool = True,
        wandb_project: str = "",
        progress_bar: bool = True,
        config_json: str = "",
        console_keys: Optional[Mapping[str, str]] = None,
    ):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        fsutil.require_owned_file(self.path, METRICS_KIND, "config.workdir")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._jsonl = os.fdopen(fd, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb  # pyright: ignore[reportMissingImports]  (optional extra `wandb`)
            except ImportError as e:
                raise ImportError(
                    "config.logging.wandb_project is set but wandb is not installed "
                    "(pip install 'advgame_jax[wandb]')"
                ) from e
            self._wandb = wandb.init(project=wandb_project, config=json.loads(config_json or "{}"))
        self._total = total_steps
        self._bar = None
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        self._console_keys = dict(console_keys or {})
        self._t0 = time.perf_counter()
        self._first_step: Optional[int] = None

    def write(self, step: int, record: Mapping[str, float]) -> None:
        scalars = _finite_scalars(record)
        self._jsonl.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in scalars.items() if v is not None}, step=step)
        if self._first_step is None:
            self._first_step = step - 1
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()
        logging.info("%s", self.summary_line(step, scalars))

    def summary_line(self, step: int, scalars: Mapping[str, Optional[float]]) -> str:
        done = step - (self._first_step or 0)
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * max(self._total - step, 0)
        parts = [f"step {step}/{self._total}"]
        for label, key in self._console_keys.items():
            v = scalars.get(key)
            if v is not None:
                parts.append(f"{label}={v:.3g}")
        parts.append(f"eta {eta:.0f}s")
        return " | ".join(parts)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()

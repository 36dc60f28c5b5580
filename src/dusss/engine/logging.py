"""Metrics logging (metrics.jsonl + metrics.csv + TensorBoard), training-curve plots, progress bars.

Rows are `{"step": int, ["epoch": int,] "time": float, **values}`. metrics.jsonl is the source of truth
(one JSON object per line, appended and flushed per row, so a killed run keeps every finished row);
metrics.csv is derived from it (its header grows as new keys appear). Non-finite floats are written as
JSON null. Only rank 0 writes; on other ranks the logger does nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dusss import runfiles
from dusss.atomic import atomic_write_text
from dusss.distributed import is_main
from dusss.errors import DataError

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")

JSONL_FILE = runfiles.METRICS
CURVES_EVERY = 5  # the loops redraw curves.png every this many epochs and at the end (a plot costs ~0.5 s)
# ... but not sooner than this many seconds after the last drawing (on a small run five plots were 15 % of the
# wall time; a run's last curves are always drawn by `finish_run`)
CURVES_MIN_INTERVAL_S = 60.0
CSV_FILE = runfiles.METRICS_CSV
TB_DIR = "tb"
_TB_WARNED = False


def _scalar(value: Any) -> Any:
    """Python scalar for JSON: tensors/numpy → float/int, non-finite → None, str/bool/None kept."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise ValueError(f"metric value must be a scalar, got shape {tuple(value.shape)}") from None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file; an unparseable (partly written) line is skipped."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def val_stability(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Stability of a training run from its metrics rows: best val Dice and its epoch, the final val Dice,
    the drop between them, the lowest val Dice from the best epoch on, and the optimizer steps."""
    vals = [float(r["val/dice"]) for r in rows]
    best = max(vals)
    at = vals.index(best)
    return {"best_val": best, "best_epoch": int(rows[at].get("epoch", at + 1)), "final_val": vals[-1],
            "drop": best - vals[-1], "min_val_after_best": min(vals[at:]), "steps": int(rows[-1]["step"])}


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            cols.setdefault(k, None)
    return list(cols)


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


class MetricsLogger:
    """Append metric rows to RUN/metrics.jsonl and RUN/metrics.csv, and scalars to TensorBoard (RUN/tb).

    Resume-safe: existing rows are kept and new ones appended; call `truncate_after(epoch)` after
    restoring a checkpoint to drop rows logged beyond it. `fresh=True` deletes earlier rows instead.
    A partly written last line (killed process) is dropped when the logger opens the file.
    Use as a context manager or call `close()`.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, fresh: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.curves_drawn_at = float("-inf")  # time.monotonic() of the loop's last curves drawing
        self.jsonl = self.run_dir / JSONL_FILE
        self.csv = self.run_dir / CSV_FILE
        self.enabled = is_main()
        self._want_tb = tensorboard
        self._writer: Any = None
        self._purge_step: int | None = None
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.jsonl.is_file() and not fresh:
            self.rows = read_metrics(self.jsonl)
        self.columns = _columns(self.rows)
        self._rewrite()  # drops a torn last line; (re)creates the CSV

    # -- writing --
    def log(self, step: int, values: Mapping[str, Any], epoch: int | None = None) -> dict[str, Any]:
        """Append one row (`step`, optional `epoch`, wall time, `values`); returns the row as written.

        Rows without `epoch` are treated as logged at epoch == step by `truncate_after`; pass `epoch`
        when logging per-iteration rows.
        """
        row: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            row["epoch"] = int(epoch)
        row["time"] = round(time.time(), 3)
        for k, v in values.items():
            if k in ("step", "epoch", "time"):
                raise ValueError(f"metric name {k!r} is reserved")
            row[str(k)] = _scalar(v)
        if not self.enabled:
            return row
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
            fh.flush()
        new_cols = [k for k in row if k not in self.columns]
        if new_cols:
            self.columns.extend(new_cols)
            atomic_write_text(self.csv, _csv_text(self.columns, self.rows))
        else:
            with open(self.csv, "a", encoding="utf-8", newline="") as fh:
                fh.write(_csv_text(self.columns, [row], header=False))
        self._tb_log(row)
        return row

    def truncate_after(self, epoch: int) -> int:
        """Drop rows whose epoch (or step, for rows without one) is > `epoch`; returns how many were dropped."""
        if not self.enabled:
            return 0
        keep = [r for r in self.rows if int(r.get("epoch", r.get("step", 0))) <= epoch]
        dropped = len(self.rows) - len(keep)
        if dropped:
            self.rows = keep
            self.columns = _columns(keep)
            self._rewrite()
            last = max((int(r.get("step", 0)) for r in keep), default=-1)
            self._purge_step = last + 1
            if self._writer is not None:  # reopen so TensorBoard hides the purged steps
                self._writer.close()
                self._writer = None
        return dropped

    def _rewrite(self) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.rows))
        atomic_write_text(self.csv, _csv_text(self.columns, self.rows))

    # -- TensorBoard --
    def _tb_log(self, row: Mapping[str, Any]) -> None:
        global _TB_WARNED
        if not self._want_tb:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # noqa: BLE001 - tensorboard missing or broken: metrics files still work
                self._want_tb = False
                if not _TB_WARNED:
                    _TB_WARNED = True
                    warnings.warn(f"TensorBoard logging disabled ({exc.__class__.__name__}: {exc})", stacklevel=3)
                return
            self._writer = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=self._purge_step)
        step = int(row["step"])
        for k, v in row.items():
            if k in ("step", "time") or isinstance(v, (bool, str)) or v is None:
                continue
            self._writer.add_scalar(k, v, global_step=step)

    def flush(self) -> None:
        """Flush TensorBoard events (the metrics files are flushed at every row)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close TensorBoard and rewrite the CSV from the rows."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.enabled:
            atomic_write_text(self.csv, _csv_text(self.columns, self.rows))

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- curves

_PANELS: list[tuple[str, re.Pattern[str]]] = [
    ("loss", re.compile(r"loss", re.IGNORECASE)),
    ("pseudo-label Dice", re.compile(r"(pseudo|(^|[/_.])pl([/_.]|$)).*dice|dice.*(teacher|text|merged)", re.IGNORECASE)),
    ("validation Dice / IoU", re.compile(r"(^|[/_.])val.*(dice|iou)|(dice|iou).*(^|[/_.])val", re.IGNORECASE)),
    ("retrieval R@1", re.compile(r"r@1|(^|[/_.])r1($|[/_.])|recall@?1|retrieval", re.IGNORECASE)),
    ("learning rate", re.compile(r"(^|[/_.])lr($|[/_.])|learning_rate", re.IGNORECASE)),
]
_SKIP = {"step", "epoch", "time", "seconds", "wall", "wall_s"}


def group_metric_keys(keys: Iterable[str]) -> dict[str, list[str]]:
    """Panel title -> metric keys, for the panels that have any; other keys (and `*_std`) are not plotted."""
    groups: dict[str, list[str]] = {title: [] for title, _ in _PANELS}
    for key in keys:
        if key in _SKIP or key.endswith("_std"):
            continue
        for title, pat in _PANELS:
            if pat.search(key):
                groups[title].append(key)
                break
    return {t: ks for t, ks in groups.items() if ks}


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path,
                groups: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Plot metrics.jsonl as a grid of panels (loss terms, val Dice, pseudo-label Dice, R@1, lr, ...).

    Panels come from `group_metric_keys` unless `groups` (title -> keys) is given; the x axis is `step`.
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Returns `out_png`.
    """
    from matplotlib.figure import Figure

    path = Path(metrics_jsonl)
    if not path.is_file():
        raise DataError(path, "metrics file not found")
    rows = read_metrics(path)
    numeric: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        x = float(row.get("step", i))
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                numeric.setdefault(k, []).append((x, float(v)))
    panels = dict(groups) if groups is not None else group_metric_keys(numeric)
    panels = {t: [k for k in ks if k in numeric] for t, ks in panels.items()}
    panels = {t: ks for t, ks in panels.items() if ks}

    n = max(len(panels), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.1 * nrows), dpi=100, layout="constrained")
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", color="#444444")
        ax.set_axis_off()
    for i, (title, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for k in keys:
            xs, ys = zip(*numeric[k])
            ax.plot(xs, ys, label=k, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4)
        ys_all = [y for k in keys for _, y in numeric[k]]
        if title == "learning rate" and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 20:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# ---------------------------------------------------------------- progress


def progress(iterable: Iterable[T], desc: str | None = None, total: int | None = None,
             enabled: bool = True, **kwargs: Any) -> tqdm[T]:
    """tqdm progress bar on rank 0 when `enabled`; elsewhere a silent tqdm (so `.set_postfix` still works)."""
    from tqdm import tqdm

    disable = not (enabled and is_main())
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, **kwargs)

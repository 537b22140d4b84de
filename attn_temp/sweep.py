"""Temperature sweeps: the grid, resuming a partly finished sweep, and the summary over seeds.

A sweep folder contains `sweep.json` (the configuration every run shares), `runs/<run name>/` (one
fine-tuning output folder per grid point, with `metrics.json` and `evaluation.json`) and the summary:
`summary.md`, `summary.json`, PNG plots and a model card `README.md`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import validate_temperature
from .ood import mean_confidence_interval
from .training import write_json_atomic

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
STATUS_FILE = "run_status.json"
EVALUATION_FILE = "evaluation.json"
METRICS_FILE = "metrics.json"


class SweepConfigMismatchError(ValueError):
    """Raised when a sweep folder was written by a different configuration than the one requested."""


@dataclass(frozen=True)
class GridPoint:
    """One run of a sweep: a head temperature, an attention temperature (None: not patched) and a seed."""

    head_temperature: float | None
    attention_temperature: float | None
    seed: int

    @property
    def name(self) -> str:
        return f"head-{_format(self.head_temperature)}_attn-{_format(self.attention_temperature)}_seed-{self.seed}"

    @property
    def setting(self) -> tuple[float | None, float | None]:
        """The temperatures without the seed: the key over which seeds are averaged."""
        return (self.head_temperature, self.attention_temperature)


def _format(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def format_setting(setting: tuple[float | None, float | None]) -> str:
    head, attention = setting
    parts = []
    if head is not None:
        parts.append(f"head T={head:g}")
    if attention is not None:
        parts.append(f"attention T={attention:g}")
    return ", ".join(parts) or "no temperature"


def parse_temperature_list(text: str | None, argument: str) -> list[float]:
    """Parse "0.25,1,4" into floats, raising ValueError that names `argument` on an invalid entry."""
    if text is None or text.strip() == "":
        return []
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            number = float(item)
        except ValueError:
            raise ValueError(f"`{argument}` must be comma-separated positive numbers, got {item!r} in {text!r}.") from None
        values.append(validate_temperature(argument, number))
    if len(set(values)) != len(values):
        raise ValueError(f"`{argument}` lists a temperature twice: {text!r}.")
    return values


def parse_seed_list(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"`--seeds` must be comma-separated integers, got {text!r}.") from None
    if not seeds:
        raise ValueError("`--seeds` is empty; pass at least one seed, e.g. --seeds 0,1,2.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`--seeds` lists a seed twice: {text!r}.")
    return seeds


def build_grid(
    head_temperatures: Sequence[float], attention_temperatures: Sequence[float], seeds: Sequence[int]
) -> list[GridPoint]:
    """Return every (head T, attention T, seed) combination; an empty list of temperatures means "not patched"."""
    if not head_temperatures and not attention_temperatures:
        raise ValueError(
            "The sweep grid is empty: pass --head_temperatures and/or --attention_temperatures, "
            "e.g. --head_temperatures 0.25,1,4,16,64."
        )
    heads = list(head_temperatures) or [None]
    attentions = list(attention_temperatures) or [None]
    return [GridPoint(head, attention, seed) for head in heads for attention in attentions for seed in seeds]


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def check_sweep_config(output_dir: str | os.PathLike, config: dict) -> None:
    """Write `sweep.json` in a new sweep folder, or raise SweepConfigMismatchError if an existing one differs.

    Runs of different configurations must not be averaged together, so resuming needs the same
    training options. The grid itself may grow: new temperatures or seeds become new runs.
    """
    path = Path(output_dir) / SWEEP_FILE
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SweepConfigMismatchError(f"{path} is not valid JSON ({error}); this is not a sweep folder attn_temp wrote.") from error
        differences = sorted(key for key in set(existing) | set(config) if existing.get(key) != config.get(key))
        if differences:
            details = "; ".join(f"{key}: folder has {existing.get(key)!r}, requested {config.get(key)!r}" for key in differences)
            raise SweepConfigMismatchError(
                f"{output_dir} contains a sweep with a different configuration ({details}). Runs of different "
                "configurations cannot be summarised together: use another --output_dir, or the same options."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, config)


def read_run(run_dir: str | os.PathLike) -> dict | None:
    """Return a finished or failed run's record, or None when the run has not finished."""
    run_dir = Path(run_dir)
    status_path = run_dir / STATUS_FILE
    if not status_path.exists():
        return None
    status = json.loads(status_path.read_text())
    if status.get("status") == "finished":
        status["metrics"] = json.loads((run_dir / METRICS_FILE).read_text())
        evaluation_path = run_dir / EVALUATION_FILE
        status["evaluation"] = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else {}
    return status


def mark_run(run_dir: str | os.PathLike, point: GridPoint, status: str, error: str | None = None) -> None:
    record = {"status": status, "run": point.name, "head_temperature": point.head_temperature,
              "attention_temperature": point.attention_temperature, "seed": point.seed}
    if error:
        record["error"] = error
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / STATUS_FILE, record)


# ----------------------------------------------------------------------------------------------------------------
# Summary over seeds
# ----------------------------------------------------------------------------------------------------------------


def _get(data: dict, path: str):
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def summarize_runs(records: Sequence[dict], metrics: dict[str, str]) -> list[dict]:
    """Group finished runs by temperature setting and give mean and 95% CI of each metric over seeds.

    Args:
        records: one dict per run with keys `point` (GridPoint), `status`, and for finished runs `metrics`
            and `evaluation` (the run's metrics.json and evaluation.json).
        metrics: column name -> dotted path into {"metrics": ..., "evaluation": ...}.
    """
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(record["point"].setting, []).append(record)
    rows = []
    for setting, group in groups.items():
        finished = [record for record in group if record["status"] == "finished"]
        row = {
            "head_temperature": setting[0],
            "attention_temperature": setting[1],
            "setting": format_setting(setting),
            "seeds_finished": len(finished),
            "seeds_failed": len(group) - len(finished),
            "failed_runs": [record["point"].name for record in group if record["status"] != "finished"],
        }
        for column, path in metrics.items():
            values = [_get(record, path) for record in finished]
            finite = [value for value in values if isinstance(value, (int, float)) and math.isfinite(value)]
            if finite:
                interval = mean_confidence_interval(finite)
                row[column] = {"mean": interval.mean, "ci95": interval.half_width, "values": values}
            else:
                row[column] = {"mean": math.nan, "ci95": math.nan, "values": values}
        rows.append(row)
    rows.sort(key=lambda row: (row["head_temperature"] or 0, row["attention_temperature"] or 0))
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Render summary rows as a Markdown table of `mean ± CI95` cells."""
    header = ["setting", "seeds"] + list(columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = f"{row['seeds_finished']}" + (f" ({row['seeds_failed']} failed)" if row["seeds_failed"] else "")
        cells = [row["setting"], seeds]
        for column in columns:
            mean, half_width = row[column]["mean"], row[column]["ci95"]
            if math.isnan(mean):
                cells.append("n/a")
            elif math.isnan(half_width):  # one seed: no interval
                cells.append(f"{mean:.3g}")
            elif abs(mean) >= 100:
                cells.append(f"{mean:.0f} ± {half_width:.0f}")
            else:
                cells.append(f"{mean:.3g} ± {half_width:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

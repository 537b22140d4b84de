"""PNG plots of attn_temp measurements, drawn with matplotlib's Agg backend (no display needed).

Each public function takes reports (a `RepresentationReport` or its `to_dict()`, as loaded back from JSON)
and a path, and writes the figure atomically. Sections: shared helpers, then one section per measurement.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .files import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)

RANK_METRICS = ("numerical_rank", "effective_rank", "stable_rank")


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def _report_dict(report: Any, *, full_spectrum: bool = False) -> dict[str, Any]:
    """Return the plain-dict form of a `RepresentationReport` or of an already converted dict."""
    if hasattr(report, "to_dict"):
        return report.to_dict(full_spectrum=full_spectrum)
    if isinstance(report, Mapping) and "layers" in report:
        return dict(report)
    raise ValueError(
        f"Expected a RepresentationReport or its `to_dict()` (a dict with a 'layers' key), got {type(report).__name__}."
    )


def _labelled_reports(reports: Any, labels: Sequence[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """Normalise one report, a list of reports or a {label: report} mapping to (label, dict) pairs."""
    if hasattr(reports, "to_dict") or (isinstance(reports, Mapping) and "layers" in reports):
        items = [reports]
    elif isinstance(reports, Mapping):
        if labels is not None:
            raise ValueError("Pass `labels` only with a list of reports; a mapping's keys are already the labels.")
        return [(str(label), _report_dict(report)) for label, report in reports.items()]
    else:
        items = list(reports)
    if not items:
        raise ValueError("Expected at least one report to plot, got none.")
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"Expected one label per report ({len(items)}), got {len(labels)} labels.")
    dicts = [_report_dict(report) for report in items]
    if labels is None:
        labels = [_default_label(report, index) for index, report in enumerate(dicts)]
    return list(zip(labels, dicts))


def _default_label(report: dict[str, Any], index: int) -> str:
    """Name a report by its head temperature when it has one, else by its position."""
    temperature = (report.get("temperatures") or {}).get("head_temperature")
    return f"T = {temperature:g}" if isinstance(temperature, (int, float)) else f"report {index}"


def _save(figure, path: str | os.PathLike) -> Path:
    """Write the figure to `path` as PNG, atomically, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    logger.info("Wrote %s", path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Representation rank
# ---------------------------------------------------------------------------------------------------------


def plot_rank_per_layer(
    reports: Any,
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] = ("numerical_rank", "effective_rank"),
    title: str | None = None,
) -> Path:
    """Draw rank against layer, one line per report (e.g. one per temperature), to a PNG file.

    Args:
        reports: a `RepresentationReport`, its `to_dict()`, a list of them, or a {label: report} mapping.
        path (`str` or `os.PathLike`): PNG file to write; folders are created.
        labels (`list` of `str`, *optional*): legend entries for a list of reports; defaults to
            "T = <head temperature>" or "report <i>".
        metrics (`list` of `str`): one panel per metric, from "numerical_rank", "effective_rank" and
            "stable_rank".
        title (`str`, *optional*): figure title.

    Returns:
        `Path` of the written file.
    """
    unknown = [metric for metric in metrics if metric not in RANK_METRICS]
    if unknown or not metrics:
        raise ValueError(f"`metrics` must be a non-empty list drawn from {RANK_METRICS}, got {list(metrics)}.")
    series = _labelled_reports(reports, labels)

    figure, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        layer_order: list[str] = []
        for label, report in series:
            names = [name for name, layer in report["layers"].items() if layer.get(metric) is not None]
            layer_order.extend(name for name in names if name not in layer_order)
            positions = [layer_order.index(name) for name in names]
            values = [report["layers"][name][metric] for name in names]
            axis.plot(positions, values, marker="o", label=label)
        _draw_feature_dimension(axis, series, layer_order)
        axis.set_xticks(range(len(layer_order)))
        axis.set_xticklabels(layer_order, rotation=45, ha="right")
        axis.set_xlabel("layer")
        axis.set_ylabel(metric.replace("_", " "))
        axis.set_title(_rank_panel_title(metric, series[0][1]))
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title or "Representation rank per layer")
    return _save(figure, path)


def _rank_panel_title(metric: str, report: dict[str, Any]) -> str:
    settings = report.get("settings") or {}
    details = []
    if metric == "numerical_rank" and "rank_tolerance" in settings:
        details.append(f"tolerance {settings['rank_tolerance']:g}")
    if "center" in settings:
        details.append("centred" if settings["center"] else "uncentred")
    if "num_samples" in settings:
        details.append(f"N = {settings['num_samples']}")
    name = metric.replace("_", " ")
    return f"{name} ({', '.join(details)})" if details else name


def _draw_feature_dimension(axis, series, layer_order: list[str]) -> None:
    """Mark each layer's feature dimension, the upper bound of its rank, as grey ticks."""
    dimensions = {}
    for _, report in series:
        for name, layer in report["layers"].items():
            if name in layer_order and layer.get("feature_dim") is not None:
                dimensions[name] = layer["feature_dim"]
    positions = [layer_order.index(name) for name in dimensions]
    # Dimensions far above the ranks would squash the curves; show them only when comparable.
    highest = max((line.get_ydata().max() for line in axis.get_lines() if len(line.get_ydata())), default=0)
    comparable = [(p, d) for p, d in zip(positions, dimensions.values()) if d <= 2 * max(highest, 1)]
    if comparable:
        axis.scatter(*zip(*comparable), marker="_", s=200, color="grey", label="feature dimension", zorder=0)


def plot_singular_values(
    report: Any,
    path: str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draw each layer's singular-value spectrum on a log scale, one line per layer, to a PNG file.

    Uses the full spectrum of a `RepresentationReport`; a dict from `to_dict()` has only the top
    singular values unless it was made with `to_dict(full_spectrum=True)`.

    Args:
        report: a `RepresentationReport` or its `to_dict()`.
        path (`str` or `os.PathLike`): PNG file to write.
        layers (`list` of `str`, *optional*): layer names to draw; defaults to all with a spectrum.
        normalize (`bool`): divide each spectrum by its largest value, so the numerical-rank tolerance is
            a horizontal line. Default True.
        title (`str`, *optional*): figure title.

    Returns:
        `Path` of the written file.
    """
    data = _report_dict(report, full_spectrum=True)
    available = {
        name: layer.get("singular_values") or layer.get("top_singular_values")
        for name, layer in data["layers"].items()
    }
    available = {name: values for name, values in available.items() if values}
    if layers is None:
        layers = list(available)
    missing = [name for name in layers if name not in available]
    if missing:
        raise ValueError(f"No singular values for layers {missing}; layers with a spectrum: {list(available)}.")
    if not layers:
        raise ValueError("The report has no layer with singular values to plot.")

    figure, axis = plt.subplots(figsize=(7.5, 5))
    colours = plt.cm.viridis([index / max(len(layers) - 1, 1) for index in range(len(layers))])
    for colour, name in zip(colours, layers):
        values = [value for value in available[name] if value > 0]
        if not values:
            continue
        if normalize:
            values = [value / values[0] for value in values]
        axis.plot(range(1, len(values) + 1), values, color=colour, label=name)
    tolerance = (data.get("settings") or {}).get("rank_tolerance")
    if normalize and tolerance:
        axis.axhline(tolerance, color="red", linestyle="--", linewidth=1, label=f"rank tolerance {tolerance:g}")
    axis.set_yscale("log")
    axis.set_xscale("log")
    axis.set_xlabel("index k")
    axis.set_ylabel("sigma_k / sigma_1" if normalize else "sigma_k")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.set_title(title or "Singular-value spectrum per layer (zeros omitted)")
    return _save(figure, path)

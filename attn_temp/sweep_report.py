"""The summary of a temperature sweep: a table over seeds, PNG plots and a model card."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from .sweep import format_setting, summarize_runs, write_json_atomic

logger = logging.getLogger(__name__)

# Summary columns: name -> dotted path into a run record {"metrics": metrics.json, "evaluation": evaluation.json}.
SUMMARY_METRICS = {
    "test acc": "metrics.test_accuracy",
    "train acc": "metrics.train_accuracy",
    "logits norm raw": "metrics.logits_norm_raw",
    "logits norm eff.": "metrics.logits_norm_effective",
    "rank pooled": "metrics.representations.layers.pooled.numerical_rank",
    "eff. rank pooled": "metrics.representations.layers.pooled.effective_rank",
    "rank logits": "metrics.representations.layers.logits.numerical_rank",
    "NC1": "metrics.representations.neural_collapse.nc1",
    "OOD probe pooled": "evaluation.ood_probe.pooled",
    "AUROC MSP": "evaluation.ood_detection.msp.auroc",
    "AUROC energy": "evaluation.ood_detection.energy.auroc",
    "AUROC NECO": "evaluation.ood_detection.neco.auroc",
    "FPR95 NECO": "evaluation.ood_detection.neco.fpr_at_95_tpr",
    "k for 99% acc": "evaluation.compression.smallest_k",
}
TABLE_COLUMNS = ["test acc", "train acc", "rank pooled", "rank logits", "OOD probe pooled", "AUROC MSP", "AUROC energy", "AUROC NECO", "k for 99% acc"]
SENSITIVITY_TOLERANCES = (1e-2, 1e-3, 1e-4)


def _layer_values(record: dict, section: str, key: str | None) -> dict[str, float]:
    """Per-layer values of one run: numerical rank of each layer, or probe accuracy of each layer."""
    if section == "rank":
        layers = ((record.get("metrics") or {}).get("representations") or {}).get("layers") or {}
        return {name: entry[key] for name, entry in layers.items() if isinstance(entry, dict) and key in entry}
    return dict((record.get("evaluation") or {}).get(section) or {})


def _mean_by_setting(records: Sequence[dict], extract) -> dict[tuple, dict[str, float]]:
    grouped: dict[tuple, list[dict[str, float]]] = {}
    for record in records:
        if record["status"] == "finished":
            grouped.setdefault(record["point"].setting, []).append(extract(record))
    means = {}
    for setting, values in grouped.items():
        names = [name for name in values[0] if all(name in value for value in values)]
        means[setting] = {name: sum(value[name] for value in values) / len(values) for name in names}
    return dict(sorted(means.items(), key=lambda item: (item[0][0] or 0, item[0][1] or 0)))


def _swept_axis(rows: Sequence[dict]) -> tuple[str, str]:
    heads = {row["head_temperature"] for row in rows}
    return ("head_temperature", "head temperature T") if len(heads) > 1 or None not in heads else (
        "attention_temperature", "attention temperature T")


def _plot_lines_per_layer(means, path: Path, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.viridis([i / max(len(means) - 1, 1) for i in range(len(means))])
    for color, (setting, values) in zip(colors, means.items()):
        axis.plot(list(values), list(values.values()), marker="o", color=color, label=format_setting(setting))
    axis.set_xlabel("layer")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.tick_params(axis="x", rotation=45)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_against_temperature(rows, columns: Sequence[str], path: Path, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, xlabel = _swept_axis(rows)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for column in columns:
        points = [(row[key], row[column]["mean"], row[column]["ci95"]) for row in rows if row[key] is not None]
        points = [(x, y, 0.0 if math.isnan(e) else e) for x, y, e in points if not math.isnan(y)]
        if points:
            xs, ys, errors = zip(*points)
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=column)
    axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel + " (log scale)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_compression(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(record):
        compression = (record.get("evaluation") or {}).get("compression") or {}
        return {str(k): accuracy for k, accuracy in zip(compression.get("ks", []), compression.get("accuracies", []))}

    means = _mean_by_setting(records, curve)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis([i / max(len(means) - 1, 1) for i in range(len(means))])
    for color, (setting, values) in zip(colors, means.items()):
        axis.plot([int(k) for k in values], list(values.values()), marker=".", color=color, label=format_setting(setting))
    axis.set_xscale("log", base=2)
    axis.set_xlabel("principal directions kept, k (log scale)")
    axis.set_ylabel("in-distribution test accuracy")
    axis.set_title("Compression: accuracy of a linear probe on the top-k directions of the pooled features")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sensitivity_table(records: Sequence[dict]) -> str:
    """Markdown table: mean numerical rank of the pooled features per setting, tolerance and sample count."""
    def extract(record):
        rows = (record.get("evaluation") or {}).get("rank_sensitivity") or []
        return {f"{row['tolerance']:g}@{row['sample_count']}": row["numerical_rank"] for row in rows}

    means = _mean_by_setting(records, extract)
    if not means:
        return ""
    keys = sorted(next(iter(means.values())), key=lambda key: (int(key.split("@")[1]), -float(key.split("@")[0])))
    header = ["setting"] + [f"tol {key.split('@')[0]}, n={key.split('@')[1]}" for key in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, values in means.items():
        lines.append("| " + " | ".join([format_setting(setting)] + [f"{values.get(key, math.nan):.1f}" for key in keys]) + " |")
    return "\n".join(lines)


def write_summary(output_dir, records: Sequence[dict], configuration: dict) -> str:
    """Write summary.json, summary.md, the plots and the sweep's model card; return the Markdown table."""
    from .sweep import format_table

    output_dir = Path(output_dir)
    rows = summarize_runs(records, SUMMARY_METRICS)
    table = format_table(rows, TABLE_COLUMNS)
    full_table = format_table(rows, list(SUMMARY_METRICS))

    plots = {
        "rank_per_layer.png": "numerical rank per layer (mean over seeds)",
        "probe_per_layer.png": "OOD linear-probe accuracy per layer",
        "accuracy_vs_temperature.png": "accuracy against temperature",
        "ood_vs_temperature.png": "OOD metrics against temperature",
        "compression.png": "compression curve",
    }
    _plot_lines_per_layer(
        _mean_by_setting(records, lambda record: _layer_values(record, "rank", "numerical_rank")),
        output_dir / "rank_per_layer.png", "numerical rank (tolerance 1e-3)", "Numerical rank per layer",
    )
    _plot_lines_per_layer(
        _mean_by_setting(records, lambda record: _layer_values(record, "ood_probe", None)),
        output_dir / "probe_per_layer.png", "OOD probe accuracy", "OOD transfer: linear probe on frozen features",
    )
    _plot_against_temperature(rows, ["test acc", "train acc"], output_dir / "accuracy_vs_temperature.png", "accuracy", "Accuracy (mean and 95% CI over seeds)")
    _plot_against_temperature(
        rows, ["OOD probe pooled", "AUROC MSP", "AUROC energy", "AUROC NECO"], output_dir / "ood_vs_temperature.png",
        "accuracy / AUROC", "OOD transfer (probe) and OOD detection (AUROC)",
    )
    _plot_compression(records, output_dir / "compression.png")

    sensitivity = sensitivity_table(records)
    markdown = "\n\n".join(
        part for part in (
            "# Sweep summary",
            "Mean ± half-width of the 95% Student-t confidence interval over seeds; a single seed shows the mean alone.",
            table,
            "## All metrics",
            full_table,
            "## Rank of the pooled features at several tolerances and sample counts",
            sensitivity,
        ) if part
    ) + "\n"
    (output_dir / "summary.md").write_text(markdown)
    write_json_atomic(output_dir / "summary.json", {"configuration": configuration, "rows": rows, "runs": [
        {"run": record["point"].name, "status": record["status"], "error": record.get("error")} for record in records
    ]})
    _write_card(output_dir, records, rows, table, sensitivity, plots, configuration)
    return table


def _write_card(output_dir: Path, records, rows, table: str, sensitivity: str, plots: dict, configuration: dict) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    from .files import write_text_atomic

    finetune = configuration.get("finetune", {})
    data = ModelCardData(
        tags=["attn_temp", "softmax-temperature", "temperature-sweep"],
        datasets=[finetune.get("dataset_name") or "wordnet_nouns"],
        library_name="transformers",
    )
    data.attn_temp = {
        "sweep": True,
        "settings": [row["setting"] for row in rows],
        "seeds_finished": {row["setting"]: row["seeds_finished"] for row in rows},
    }
    run_links = "\n".join(
        f"- [{record['point'].name}](runs/{record['point'].name}/README.md): {record['status']}" for record in records
    )
    body = "\n\n".join([
        "# Temperature sweep",
        "Each run fine-tunes the same model on the same data at one temperature and seed, with "
        "attn_temp patching softmax(z / T) into the head and/or attention.",
        "## Results (mean ± 95% CI over seeds)",
        table,
        "\n".join(f"![{caption}]({name})" for name, caption in plots.items()),
        "## Rank sensitivity to tolerance and sample count",
        sensitivity or "Not measured (the sweep ran with --skip_evaluation).",
        "## Runs",
        run_links,
        "## Configuration shared by every run",
        "```json\n" + json.dumps(configuration, indent=2, default=str) + "\n```",
    ])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
    write_text_atomic(output_dir / "README.md", str(card))

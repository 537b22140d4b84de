"""End-to-end tests of scripts/sweep.py on the real MiniLM and WordNet glosses, and of the sweep helpers."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attn_temp.sweep import (
    GridPoint,
    SweepConfigMismatchError,
    build_grid,
    check_sweep_config,
    format_table,
    parse_temperature_list,
    summarize_runs,
)

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "scripts" / "sweep.py"
# A few optimizer steps on a few glosses: enough to run every stage, not to learn much.
TINY = [
    "--max_train_samples", "48", "--max_eval_samples", "32", "--measure_samples", "32",
    "--per_device_train_batch_size", "16", "--max_train_steps", "2", "--max_length", "24",
    "--probe_samples", "60", "--test_samples", "40",
]


def run_sweep(*arguments, check=True, timeout=900):
    command = [sys.executable, str(SWEEP), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"sweep failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, minilm_path):
    output_dir = tmp_path_factory.mktemp("sweep")
    result = run_sweep("--head_temperatures", "0.5,8", "--seeds", "0", "--output_dir", str(output_dir), *TINY)
    return output_dir, result


def test_tiny_sweep_writes_summary(tiny_sweep):
    output_dir, result = tiny_sweep
    for name in ("summary.md", "summary.json", "README.md", "sweep.json", "rank_per_layer.png",
                 "accuracy_vs_temperature.png", "ood_vs_temperature.png", "compression.png", "probe_per_layer.png"):
        assert (output_dir / name).is_file(), name
    assert "| head T=0.5 |" in result.stdout
    assert "| head T=8 |" in result.stdout


def test_tiny_sweep_summary_holds_run_numbers(tiny_sweep):
    output_dir, _ = tiny_sweep
    summary = json.loads((output_dir / "summary.json").read_text())
    rows = {row["head_temperature"]: row for row in summary["rows"]}
    assert sorted(rows) == [0.5, 8.0]
    for temperature, row in rows.items():
        run_dir = output_dir / "runs" / f"head-{temperature:g}_attn-none_seed-0"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        assert row["test acc"]["mean"] == pytest.approx(metrics["test_accuracy"])
        assert row["rank pooled"]["mean"] == metrics["representations"]["layers"]["pooled"]["numerical_rank"]
        assert row["AUROC NECO"]["mean"] == pytest.approx(evaluation["ood_detection"]["neco"]["auroc"])
        assert row["OOD probe pooled"]["mean"] == pytest.approx(evaluation["ood_probe"]["pooled"])
        assert metrics["temperatures"]["head_temperature"] == temperature
        assert evaluation["ood_dataset_name"] == "wordnet_verbs"
        assert 1 <= evaluation["compression"]["smallest_k"] <= 384


def test_tiny_sweep_card_lists_runs(tiny_sweep):
    from huggingface_hub import ModelCard

    output_dir, _ = tiny_sweep
    card = ModelCard.load(output_dir / "README.md")
    assert "attn_temp" in card.data.tags
    assert "runs/head-0.5_attn-none_seed-0/README.md" in card.text
    assert "| head T=8 |" in card.text


def test_sweep_resume_skips_finished_runs(tiny_sweep):
    output_dir, _ = tiny_sweep
    finished = output_dir / "runs" / "head-0.5_attn-none_seed-0" / "metrics.json"
    modified = finished.stat().st_mtime_ns
    result = run_sweep("--head_temperatures", "0.5,8", "--seeds", "0", "--output_dir", str(output_dir), *TINY)
    assert "head-0.5_attn-none_seed-0: finished earlier, skipped" in result.stdout
    assert "head-8_attn-none_seed-0: finished earlier, skipped" in result.stdout
    assert finished.stat().st_mtime_ns == modified


def test_sweep_rejects_other_configuration(tiny_sweep):
    output_dir, _ = tiny_sweep
    changed = [item if item != "24" else "32" for item in TINY]  # another --max_length
    result = run_sweep("--head_temperatures", "0.5,8", "--output_dir", str(output_dir), *changed, check=False)
    assert result.returncode != 0
    assert "different configuration" in result.stderr
    assert "max_length" in result.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--seeds", "0"], "grid is empty"),
        (["--head_temperatures", "1,-2"], "--head_temperatures"),
        (["--head_temperatures", "1,nan"], "nan"),
        (["--attention_temperatures", "0.5,x"], "'x'"),
        (["--head_temperatures", "1", "--seed", "3"], "--seed is set by the sweep"),
    ],
)
def test_sweep_bad_input_fails_fast(tmp_path, capsys, arguments, message):
    spec = importlib.util.spec_from_file_location("sweep_script", SWEEP)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--output_dir", str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def test_grid_is_product_over_seeds():
    grid = build_grid([1.0, 4.0], [], [0, 1])
    assert [point.name for point in grid] == [
        "head-1_attn-none_seed-0", "head-1_attn-none_seed-1", "head-4_attn-none_seed-0", "head-4_attn-none_seed-1",
    ]


def test_temperature_list_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        parse_temperature_list("1,1.0", "--head_temperatures")


def test_sweep_config_mismatch_raises(tmp_path):
    check_sweep_config(tmp_path, {"finetune": {"max_length": 24}})
    check_sweep_config(tmp_path, {"finetune": {"max_length": 24}})
    with pytest.raises(SweepConfigMismatchError, match="max_length"):
        check_sweep_config(tmp_path, {"finetune": {"max_length": 32}})


def test_summary_confidence_interval_and_failed_runs():
    records = [
        {"point": GridPoint(4.0, None, seed), "status": "finished", "metrics": {"test_accuracy": value}}
        for seed, value in enumerate([0.5, 0.6, 0.7])
    ]
    records.append({"point": GridPoint(4.0, None, 3), "status": "failed", "error": "loss is nan"})
    rows = summarize_runs(records, {"test acc": "metrics.test_accuracy"})
    assert len(rows) == 1
    row = rows[0]
    assert row["seeds_finished"] == 3
    assert row["seeds_failed"] == 1
    assert row["failed_runs"] == ["head-4_attn-none_seed-3"]
    assert row["test acc"]["mean"] == pytest.approx(0.6)
    # t(0.975, 2) = 4.303, standard error 0.1 / sqrt(3)
    assert row["test acc"]["ci95"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-3)
    assert "3 (1 failed)" in format_table(rows, ["test acc"])

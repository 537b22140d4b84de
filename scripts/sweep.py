# A temperature sweep fine-tunes the same model and data over a grid of head and/or attention temperatures
# and several seeds. Each run is evaluated for per-layer rank, OOD transfer, OOD detection and compression.
# The summary gives means with 95% confidence intervals over seeds, plots and a model card.
#
# Runs on CPU or GPU, one process or several:
#   python scripts/sweep.py --head_temperatures 0.5,4,32 --seeds 0 --output_dir outputs/sweep
#   accelerate launch scripts/sweep.py --head_temperatures 0.25,1,4,16,64 --seeds 0,1,2 --output_dir outputs/sweep
#   torchrun --nproc_per_node 2 scripts/sweep.py ...      (CPU: two communicating processes)
# Options the sweep does not know are passed to every run of scripts/finetune.py, e.g. --max_train_samples.
# Running the same command again resumes the sweep: finished runs are skipped.

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm.auto import tqdm

from attn_temp import training
from attn_temp.evaluation import default_ood_dataset, evaluate_run
from attn_temp.sweep import (
    EVALUATION_FILE,
    METRICS_FILE,
    SweepConfigMismatchError,
    build_grid,
    check_sweep_config,
    mark_run,
    parse_seed_list,
    parse_temperature_list,
    read_run,
    write_json_atomic,
)
from attn_temp.sweep_report import write_summary

logger = logging.getLogger("attn_temp.sweep")

# Options that the sweep sets for each run; passing them through to finetune.py would be ambiguous.
PER_RUN_OPTIONS = ("--seed", "--output_dir", "--head_temperature", "--attention_temperature", "--push_to_hub")


def build_parser():
    # allow_abbrev=False: otherwise argparse reads finetune.py's --seed as an abbreviation of --seeds.
    parser = argparse.ArgumentParser(
        description="Sweep head and/or attention temperatures over seeds; other options go to finetune.py.",
        allow_abbrev=False,
    )
    parser.add_argument("--head_temperatures", default=None, help="comma-separated head temperatures, e.g. 0.25,1,4,16,64")
    parser.add_argument("--attention_temperatures", default=None, help="comma-separated attention temperatures for every layer, e.g. 0.5,1,2,4,8")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the summary gives mean and 95%% CI over them")
    parser.add_argument("--output_dir", required=True, help="sweep folder: runs/<run>/ per grid point, plus the summary")
    parser.add_argument("--ood_dataset_name", default=None, help="OOD data set for probes and detection (default: wordnet_verbs for text, digits for fashion_mnist)")
    parser.add_argument("--probe_samples", type=int, default=2000, help="training samples of each linear probe, per data set")
    parser.add_argument("--test_samples", type=int, default=1000, help="test samples for probes, OOD detection and compression")
    parser.add_argument("--skip_evaluation", action="store_true", help="train and measure ranks only; no OOD probes, detection or compression")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args, finetune_argv = parser.parse_known_args(argv)
    for option in PER_RUN_OPTIONS:
        if any(item == option or item.startswith(option + "=") for item in finetune_argv):
            parser.error(f"{option} is set by the sweep for each run; use --head_temperatures, --attention_temperatures, --seeds or --output_dir.")
    try:
        head = parse_temperature_list(args.head_temperatures, "--head_temperatures")
        attention = parse_temperature_list(args.attention_temperatures, "--attention_temperatures")
        args.grid = build_grid(head, attention, parse_seed_list(args.seeds))
    except ValueError as error:
        parser.error(str(error))
    for name in ("probe_samples", "test_samples"):
        if getattr(args, name) < 2:
            parser.error(f"--{name} must be at least 2, got {getattr(args, name)}.")
    args.finetune_argv = finetune_argv
    return args


def run_arguments(args, point, run_dir):
    argv = list(args.finetune_argv) + ["--seed", str(point.seed), "--output_dir", str(run_dir)]
    if point.head_temperature is not None:
        argv += ["--head_temperature", repr(point.head_temperature)]
    if point.attention_temperature is not None:
        argv += ["--attention_temperature", repr(point.attention_temperature)]
    return training.parse_args(argv)


def sweep_configuration(args, template) -> dict:
    """The settings every run must share; `sweep.json` stores them and a resumed sweep must match."""
    shared = {key: value for key, value in vars(template).items() if key not in ("seed", "output_dir", "head_temperature", "attention_temperature", "hub_token")}
    return {
        "finetune": json.loads(json.dumps(shared, default=str)),
        "ood_dataset_name": args.ood_dataset_name,
        "probe_samples": args.probe_samples,
        "test_samples": args.test_samples,
        "skip_evaluation": args.skip_evaluation,
    }


def has_diverged(metrics: dict) -> str | None:
    for key in ("eval_loss", "eval_accuracy", "logits_norm_raw"):
        value = metrics.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value}"
    return None


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)

    # ----- CHECKS, before any run starts -----
    # Validate with the sweep folder in place of a run folder, so that a finished run does not fail the check.
    template = run_arguments(args, args.grid[0], output_dir)
    training.validate_args(template)
    dataset_name = template.dataset_name or ("fashion_mnist" if training.is_image_dataset(template) else "wordnet_nouns")
    if not args.skip_evaluation:
        args.ood_dataset_name = args.ood_dataset_name or default_ood_dataset(dataset_name)
    try:
        check_sweep_config(output_dir, sweep_configuration(args, template))
    except SweepConfigMismatchError as error:
        sys.exit(f"error: {error}")
    accelerator = training.make_accelerator(template)

    # ----- RUNS -----
    records = []
    progress = tqdm(args.grid, desc="sweep", disable=not accelerator.is_main_process)
    for point in progress:
        run_dir = output_dir / "runs" / point.name
        record = read_run(run_dir)
        if record is not None:
            accelerator.print(f"{point.name}: {record['status']} earlier, skipped")
            records.append({**record, "point": point})
            continue
        progress.set_postfix_str(point.name)
        run_args = run_arguments(args, point, run_dir)
        if training.find_latest_checkpoint(run_dir) is not None:
            run_args.resume_from_checkpoint = "latest"  # an interrupted run continues from its last checkpoint
        try:
            if (run_dir / METRICS_FILE).exists():  # trained, but interrupted before its evaluation
                metrics = json.loads((run_dir / METRICS_FILE).read_text())
            else:
                metrics = training.training_function(run_args, accelerator=accelerator)
        except (FloatingPointError, ValueError, RuntimeError) as error:
            # A diverged run ends in NaN features or losses; record it and go on with the grid.
            logger.exception("Run %s raised an error.", point.name)
            failure = f"{type(error).__name__}: {error}"
        else:
            failure = has_diverged(metrics)
        if failure is None and not args.skip_evaluation:
            evaluation = evaluate_run(
                run_dir,
                dataset_name=dataset_name,
                ood_dataset_name=args.ood_dataset_name,
                probe_samples=args.probe_samples,
                test_samples=args.test_samples,
                max_length=run_args.max_length,
                accelerator=accelerator,
                seed=point.seed,
            )
            if accelerator.is_main_process:
                write_json_atomic(run_dir / EVALUATION_FILE, evaluation)
        if accelerator.is_main_process:
            mark_run(run_dir, point, "failed" if failure else "finished", failure)
        accelerator.wait_for_everyone()
        if failure:
            logger.warning("Run %s failed (%s); recorded as failed, continuing.", point.name, failure)
        records.append({**read_run(run_dir), "point": point})

    # ----- SUMMARY -----
    if accelerator.is_main_process:
        table = write_summary(output_dir, records, sweep_configuration(args, template))
        print(table)
        print(f"\nSweep summary: {output_dir / 'summary.md'}\nSweep model card: {output_dir / 'README.md'}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
# Copyright 2025 The attn_temp developers. Licensed under the Apache License, Version 2.0.
#
# Benchmark of the fine-tuning loop of scripts/finetune.py, in one process and one run:
#
# 1. Time per epoch of `attn_temp.training.training_function` against transformers' `Trainer` on the same
#    model (all-MiniLM-L6-v2 patched at head T = 1), the same glosses, batch size, padding (dynamic, to the
#    longest text of each batch), learning rate, schedule, weight decay and gradient clipping. In-loop
#    measurement is off for this part (`--measure_every end`) and the time of the step-0 and final
#    measurements is subtracted, so both sides time the training loop alone. Target: ratio <= 1.0.
# 2. The share of training time spent measuring rank at the default cadence and sample count, on the
#    default job (all defaults of finetune.py). Target: under 10%.
#
# The two sides alternate (finetune, Trainer, finetune, ...) so that load from other processes hits both;
# the median of each side is reported. Both sides shuffle with accelerate's seedable sampler from the same
# seed. The script records the shape and token count of every collated batch on both sides and reports
# whether they trained on the same batches in the same order, so that with dynamic padding both do the same work.
#
#   python scripts/bench_finetune.py                       # about 10 minutes on 2 idle cores
#   python scripts/bench_finetune.py --quick               # smaller epochs, a rough check
#   python scripts/bench_finetune.py --json bench.json     # also write the numbers as JSON

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attn_temp.training  # noqa: E402
from attn_temp import patch_model  # noqa: E402
from attn_temp.training import (  # noqa: E402
    FINETUNE_LEARNING_RATE,
    _preprocess,
    default_args,
    default_model_path,
    load_raw_datasets,
    make_accelerator,
    read_jsonl,
    resolve_columns,
    training_function,
)


def build_parser():
    parser = argparse.ArgumentParser(description="Time finetune.py's training loop against transformers' Trainer.")
    parser.add_argument("--train_samples", type=int, default=1024, help="Training glosses per epoch for part 1.")
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of both sides.")
    parser.add_argument("--max_length", type=int, default=64, help="Maximum tokens per gloss.")
    parser.add_argument(
        "--pad_to_max_length",
        action="store_true",
        help="Pad every gloss to --max_length on both sides, so that batch order cannot change the work per epoch.",
    )
    parser.add_argument("--repeats", type=int, default=2, help="Epochs timed per side (median reported).")
    parser.add_argument(
        "--share_train_samples",
        type=int,
        default=None,
        help="Training glosses of the part-2 run. Defaults to the default job's (all finetune.py defaults).",
    )
    parser.add_argument(
        "--skip_share", action="store_true", help="Skip part 2 (the default job with its measurement cadence)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="Part 1 on 256 samples with 1 repeat, part 2 on 1,024 samples (a rough check)."
    )
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    return parser


@contextlib.contextmanager
def recording_batches(batches: list):
    """Wrap the collator that both sides build with `attn_temp.training._collator` to record each batch.

    Each collated batch is recorded as (examples, padded length, non-padding tokens).
    """
    build_collator = attn_temp.training._collator

    def recording_collator(*args, **kwargs):
        collate = build_collator(*args, **kwargs)

        def collate_and_record(features):
            batch = collate(features)
            if "attention_mask" in batch:
                mask = batch["attention_mask"]
                batches.append((mask.shape[0], mask.shape[1], int(mask.sum())))
            return batch

        return collate_and_record

    attn_temp.training._collator = recording_collator
    try:
        yield batches
    finally:
        attn_temp.training._collator = build_collator


def same_training_batches(finetune_batches: list, trainer_batches: list) -> bool:
    """Return whether the Trainer's batches occur, in order, among finetune.py's.

    finetune.py also collates measurement and evaluation batches; the Trainer side only trains.
    """
    if not trainer_batches:
        return False
    length = len(trainer_batches)
    return any(
        finetune_batches[start : start + length] == trainer_batches
        for start in range(len(finetune_batches) - length + 1)
    )


def finetune_epoch_seconds(args, output_dir) -> tuple[float, int]:
    """Run one epoch of finetune.py's loop; return the loop time without the rank measurements, and its steps."""
    run = default_args(
        output_dir=output_dir,
        max_train_samples=args.train_samples,
        max_eval_samples=64,
        measure_samples=64,
        measure_every="end",
        max_length=args.max_length,
        pad_to_max_length=args.pad_to_max_length,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        logging_steps=10,
    )
    metrics = training_function(run)
    return metrics["train_seconds"] - metrics["measure_seconds"], metrics["completed_steps"]


def trainer_epoch_seconds(args, output_dir) -> float:
    """Run one epoch of transformers' Trainer on the same model, data and settings; return its train time."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    run = default_args(output_dir=output_dir, max_train_samples=args.train_samples, max_length=args.max_length,
                       pad_to_max_length=args.pad_to_max_length, max_eval_samples=64, measure_samples=64)
    set_seed(run.seed)
    # TrainingArguments resets accelerate's shared state, so this accelerator is used only before it exists.
    accelerator = make_accelerator(run)
    raw = load_raw_datasets(run)
    input_column, label_column, names, is_image = resolve_columns(raw, run)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    processed = _preprocess(raw, run, tokenizer, input_column, label_column, names, is_image, accelerator)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=len(names))
    patch_model(model, head_temperature=run.head_temperature)
    collator = attn_temp.training._collator(run, tokenizer, False, accelerator)
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=FINETUNE_LEARNING_RATE,
        weight_decay=run.weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=run.max_grad_norm,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=run.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=processed["train"],
        data_collator=collator,
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def measurement_share(args, output_dir, step_seconds: float) -> dict:
    """Run the default job (on --share_train_samples glosses when given) and return its measurement share.

    Also projects the share of the full default job (250 steps, 4 measurements at the default cadence) from
    the measured seconds per measurement and `step_seconds` (seconds per optimizer step from part 1).
    """
    overrides = {"output_dir": output_dir}
    if args.share_train_samples is not None:
        overrides["max_train_samples"] = args.share_train_samples
    metrics = training_function(default_args(**overrides))
    measurements = [r for r in read_jsonl(os.path.join(output_dir, "metrics.jsonl")) if r["type"] == "measurement"]
    seconds_per_measurement = metrics["measure_seconds"] / len(measurements)
    defaults = default_args()
    default_steps = math.ceil(defaults.max_train_samples / defaults.per_device_train_batch_size)
    default_measurements = 1 + math.ceil(default_steps / defaults.measure_every)
    projected = default_measurements * seconds_per_measurement
    return {
        "train_samples": metrics["args"]["max_train_samples"],
        "optimizer_steps": metrics["completed_steps"],
        "measure_every": metrics["args"]["measure_every"],
        "measure_samples": metrics["args"]["measure_samples"],
        "measurements": len(measurements),
        "seconds_per_measurement": seconds_per_measurement,
        "train_seconds": metrics["train_seconds"],
        "measure_seconds": metrics["measure_seconds"],
        "measure_share": metrics["measure_share"],
        "projected_default_job_share": projected / (default_steps * step_seconds + projected),
        "eval_accuracy": metrics["eval_accuracy"],
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.train_samples, args.repeats, args.share_train_samples = 256, 1, 1024
    # Only this script's lines on stdout: the runs' own logging stays at warnings.
    import logging

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()

    finetune_times, trainer_times, same_batches = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            with recording_batches([]) as finetune_batches:
                seconds, steps = finetune_epoch_seconds(args, os.path.join(scratch, f"finetune_{repeat}"))
            finetune_times.append(seconds)
            with recording_batches([]) as trainer_batches:
                trainer_times.append(trainer_epoch_seconds(args, os.path.join(scratch, f"trainer_{repeat}")))
            same_batches.append(same_training_batches(finetune_batches, trainer_batches))
            print(
                f"repeat {repeat}: finetune.py {finetune_times[-1]:.1f} s, Trainer {trainer_times[-1]:.1f} s, "
                f"same batches: {same_batches[-1]}",
                flush=True,
            )
        step_seconds = statistics.median(finetune_times) / steps
        share = None if args.skip_share else measurement_share(args, os.path.join(scratch, "default_job"), step_seconds)

    finetune_median, trainer_median = statistics.median(finetune_times), statistics.median(trainer_times)
    results = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "train_samples": args.train_samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "pad_to_max_length": args.pad_to_max_length,
        "finetune_epoch_seconds": finetune_times,
        "trainer_epoch_seconds": trainer_times,
        "ratio_finetune_over_trainer": finetune_median / trainer_median,
        "same_training_batches": all(same_batches),
        "measurement": share,
    }
    padding = f"padded to {args.max_length} tokens" if args.pad_to_max_length else f"dynamic padding to <= {args.max_length} tokens"
    print(f"\nTime per epoch ({args.train_samples} glosses, batch {args.batch_size}, {padding})")
    print(f"  finetune.py loop   median {finetune_median:8.1f} s  runs {[round(t, 1) for t in finetune_times]}")
    print(f"  transformers Trainer median {trainer_median:6.1f} s  runs {[round(t, 1) for t in trainer_times]}")
    print(f"  ratio finetune.py / Trainer: {results['ratio_finetune_over_trainer']:.3f} (target <= 1.0)")
    print(f"  same training batches in the same order on both sides: {results['same_training_batches']}")
    if share is not None:
        print(
            f"Measurement share at the default cadence (every {share['measure_every']} steps, "
            f"{share['measure_samples']} samples, {share['optimizer_steps']} steps): "
            f"{share['measure_seconds']:.1f} s of {share['train_seconds']:.1f} s = {100 * share['measure_share']:.1f}% "
            "(target < 10%)"
        )
        print(
            f"  {share['seconds_per_measurement']:.1f} s per measurement, {step_seconds:.2f} s per step: projected share "
            f"of the full default job {100 * share['projected_default_job_share']:.1f}%"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune (or train from scratch) a transformers classifier at a chosen softmax temperature, tracking rank.

This is the reusable core of `scripts/finetune.py` and of the temperature sweep:

- `parse_args(argv)` builds the run arguments (option names follow transformers' `run_glue_no_trainer.py`),
- `validate_args(args)` rejects bad input before any long work starts,
- `training_function(args, accelerator=None)` runs one job and returns its final metrics.

`training_function` may be called several times in one process, as a sweep does. Each call seeds itself and
builds its own model, optimizer and data loaders. It keeps no module-level state except a cache of the raw
data sets, and it releases the accelerator's references when it returns, after a failure too. A caller may pass one
`Accelerator` (from `make_accelerator`) to every call; without one each call creates its own.

Argument parsing and checks live in `attn_temp.training_args`, data and model set-up in
`attn_temp.training_data`; this module re-exports their public names.

Outputs in `--output_dir`: `save_pretrained` weights and config (temperatures in `config.attn_temp`), the
tokenizer or image processor, `metrics.jsonl` (one line per measurement point and evaluation),
`metrics.json` (final metrics and the run arguments), PNG plots, `README.md` (the model card), and
`step_{n}`/`epoch_{n}` checkpoints when `--checkpointing_steps` is set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from .files import restore_ordinary_modes, write_text_atomic

# Re-exported: with training_function they form the public API of the fine-tuning job (see __all__).
from .training_args import (  # noqa: F401
    CHECKPOINT_NAME,
    FINETUNE_LEARNING_RATE,
    FROM_SCRATCH_LEARNING_RATE,
    METRICS_FILE,
    CheckpointError,
    build_parser,
    check_checkpoint,
    default_args,
    find_latest_checkpoint,
    parse_args,
    parse_attention_temperature,
    resolve_checkpoint,
    validate_args,
)
from .training_data import (  # noqa: F401
    DEFAULT_TEXT_DATASET,
    DEFAULT_VIT_CONFIG,
    IMAGE_DATASETS,
    _build_processor_and_model,
    _collator,
    _loader,
    _preprocess,
    default_model_path,
    is_image_dataset,
    load_raw_datasets,
    resolve_columns,
    vit_config_overrides,
)

__all__ = [
    "CheckpointError",
    "build_parser",
    "check_checkpoint",
    "default_args",
    "default_model_path",
    "evaluate",
    "find_latest_checkpoint",
    "is_image_dataset",
    "load_raw_datasets",
    "make_accelerator",
    "parse_args",
    "parse_attention_temperature",
    "plot_rank_over_training",
    "read_jsonl",
    "resolve_checkpoint",
    "resolve_columns",
    "training_function",
    "validate_args",
    "vit_config_overrides",
    "DEFAULT_TEXT_DATASET",
    "DEFAULT_VIT_CONFIG",
    "IMAGE_DATASETS",
]

logger = logging.getLogger(__name__)

HISTORY_FILE = "metrics.jsonl"
RANK_PER_LAYER_PLOT = "rank_per_layer.png"
RANK_OVER_TRAINING_PLOT = "rank_over_training.png"
CARD_FILE = "README.md"
RANK_NAMES = ("numerical_rank", "effective_rank", "stable_rank")


# ---------------------------------------------------------------------------------------------------------------
# Accelerator and trackers
# ---------------------------------------------------------------------------------------------------------------


def accelerator_is_available() -> bool:
    """Return whether torch finds a GPU or another accelerator (CUDA, ROCm, XPU, MPS)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def make_accelerator(args):
    """Create the `Accelerator` of a run (or of a whole sweep, whose runs must agree on these settings).

    On a machine without a GPU it is created with `cpu=True`, because only then do the processes of
    `torchrun --nproc_per_node 2` on CPU join one gloo process group. Without it each process gets
    `num_processes == 1` and trains alone on all the data (accelerate 1.16).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        cpu=not accelerator_is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # The seedable sampler shuffles with seed + epoch: the same order on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=_tracker_names(args) if args.with_tracking else None,
        project_dir=args.output_dir,
    )


def _tracker_names(args) -> list[str]:
    value = args.report_to
    return [name.strip() for name in str(value).split(",") if name.strip()]


def _start_trackers(accelerator, args, run_name: str) -> None:
    if not args.with_tracking:
        return
    from accelerate.tracking import filter_trackers

    # A shared accelerator (a sweep) gets fresh trackers for each run, logging under this run's folder.
    accelerator.project_configuration.project_dir = args.output_dir
    accelerator.project_configuration.logging_dir = os.path.join(args.output_dir, "runs")
    accelerator.log_with = filter_trackers(_tracker_names(args), accelerator.logging_dir)
    accelerator.trackers = []
    config = {}
    for key, value in sorted(vars(args).items()):
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    accelerator.init_trackers(run_name, config=config)


def _stop_trackers(accelerator) -> None:
    # Not `accelerator.end_training()`: it also destroys the process group, which a sweep still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


# ---------------------------------------------------------------------------------------------------------------
# Training helpers
# ---------------------------------------------------------------------------------------------------------------


def _optimizer_groups(model, weight_decay: float):
    """Split trainable parameters into decayed weights and undecayed biases, norms and temperatures."""
    no_decay = ("bias", "layernorm", "layer_norm", "norm.weight", "attn_temp_log_temperature")
    decay, other = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (other if any(key in name.lower() for key in no_decay) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _make_optimizer(model, weight_decay: float, learning_rate: float, device: torch.device):
    """Create AdamW, fused into one kernel per step where torch supports it (as transformers' Trainer does)."""
    groups = _optimizer_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in ("cpu", "cuda", "xpu", "mps"))
    except RuntimeError as err:
        logger.info("Fused AdamW is not available on %s (%s); using the foreach implementation.", device, err)
        return torch.optim.AdamW(groups, lr=learning_rate)


def _current_head_temperature(model) -> float:
    from .patching import head_temperature

    value = head_temperature(model)
    if value is None:
        return 1.0
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _batch_statistics(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return [correct count, sample count, sum of raw logits norms, sum of effective logits norms]."""
    logits = logits.detach().float()
    effective = logits.norm(dim=-1)
    return torch.stack(
        [
            (logits.argmax(dim=-1) == labels).sum().float(),
            torch.tensor(float(labels.numel()), device=logits.device),
            (effective * temperature).sum(),
            effective.sum(),
        ]
    )


def evaluate(model, dataloader, accelerator) -> dict:
    """Return accuracy, mean loss and mean raw/effective logits norms of `model` on a prepared data loader.

    The model's logits are the effective ones (logits / T); raw logits norms are those times T.
    """
    model.eval()
    temperature = _current_head_temperature(accelerator.unwrap_model(model))
    totals = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for batch in dataloader:
            outputs = model(**batch)
            logits, labels = accelerator.gather_for_metrics((outputs.logits, batch["labels"]))
            losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            stats = _batch_statistics(logits, labels, temperature).double().cpu()
            totals += torch.cat([stats, losses.detach().double().cpu().reshape(1)])
    model.train()
    count = max(totals[1].item(), 1.0)
    return {
        "accuracy": totals[0].item() / count,
        "loss": totals[4].item() / count,
        "logits_norm_raw": totals[2].item() / count,
        "logits_norm_effective": totals[3].item() / count,
        "samples": int(totals[1].item()),
    }


def append_jsonl(path, record: dict) -> None:
    """Append `record` as one JSON line and flush it to disk (a partial run keeps every finished line)."""
    line = json.dumps(record, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path) -> list[dict]:
    """Read `metrics.jsonl`, keeping the last record per (type, step): a resumed run rewrites later steps."""
    records: dict[tuple, dict] = {}
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A line cut short by a crash: everything before it is still valid.
                logger.warning("Skipping unreadable line %d of %s.", line_number, path)
                continue
            records[(record.get("type"), record.get("step"))] = record
    return sorted(records.values(), key=lambda record: (record.get("step", 0), str(record.get("type"))))


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def write_json_atomic(path, data) -> None:
    """Write `data` as JSON to `path` through a temporary file in the same folder and `os.replace`."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default, sort_keys=False) + "\n")


def _summarize_report(report: dict) -> dict:
    """Keep the rank values of each layer of a measurement report (the full report stays in metrics.jsonl)."""
    layers = report.get("layers", {})
    return {name: {key: values.get(key) for key in RANK_NAMES if key in values} for name, values in layers.items()}


def _measure(model, dataloader, accelerator, args) -> tuple[dict, float]:
    """Measure per-layer ranks of `model` on the measurement data; return the report dict and the seconds spent."""
    from .measure import measure_representations

    started = time.perf_counter()
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    report = measure_representations(
        unwrapped,
        dataloader,
        accelerator=accelerator,
        max_samples=args.measure_samples,
        rank_tolerance=args.rank_tolerance,
        # Attention entropy needs a slower eager forward pass, so it is measured only when attention has a T.
        attention_entropy=args.attention_temperature is not None,
    )
    unwrapped.train(was_training)
    return report.to_dict(), time.perf_counter() - started


def _flatten_for_trackers(prefix: str, report: dict) -> dict:
    values = {}
    for layer, metrics in report.get("layers", {}).items():
        for key in RANK_NAMES:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[f"{prefix}/{layer}/{key}"] = value
    return values


def _checkpoint_start(checkpoint: Path, steps_per_epoch: int, gradient_accumulation_steps: int) -> tuple[int, int, int]:
    """Return (completed optimizer steps, epoch to start in, batches of that epoch to skip) for a checkpoint."""
    kind, number = CHECKPOINT_NAME.match(checkpoint.name).groups()
    batches_per_epoch = steps_per_epoch * gradient_accumulation_steps
    if kind == "epoch":
        epoch = int(number) + 1
        return epoch * steps_per_epoch, epoch, 0
    completed = int(number)
    batches = completed * gradient_accumulation_steps
    epoch = batches // batches_per_epoch
    return completed, epoch, batches - epoch * batches_per_epoch


# ---------------------------------------------------------------------------------------------------------------
# The training function
# ---------------------------------------------------------------------------------------------------------------


def training_function(args, accelerator=None) -> dict:
    """Train one model as `args` describe, write every output to `args.output_dir`, and return the final metrics.

    Args:
        args (`argparse.Namespace`): run arguments from `parse_args` or `default_args`; they are validated
            again here, so a caller may change fields first.
        accelerator (`accelerate.Accelerator`, *optional*): reuse this accelerator (a sweep passes one for all
            its runs); by default one is created with `make_accelerator(args)`.

    Returns:
        `dict`: the content of `metrics.json` (accuracies, per-layer ranks, logits norms, temperatures,
        timings and the run arguments).
    """
    validate_args(args)
    args.attention_temperature = parse_attention_temperature(args.attention_temperature)

    # ----- ACCELERATOR -----
    if accelerator is None:
        accelerator = make_accelerator(args)
    elif accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
    try:
        return _train(args, accelerator)
    finally:
        # Also after a failure, so that the next run of a sweep starts clean. There is no collective call here
        # because the other processes may not have failed at the same point.
        _stop_trackers(accelerator)
        accelerator.free_memory()


def _train(args, accelerator) -> dict:
    """Run the stages of `training_function` with a ready accelerator."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from . import cards
    from .patching import get_temperatures, patch_model

    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    # `accelerate launch` on CPU sets OMP_NUM_THREADS=1 unless given --cpu or --num_cpu_threads_per_process.
    logger.info(
        "Run %s on %s (%d process(es), %d torch thread(s) per process).",
        output_dir,
        accelerator.device,
        accelerator.num_processes,
        torch.get_num_threads(),
    )

    # ----- DATA -----
    raw = load_raw_datasets(args)
    input_column, label_column, label_names, is_image = resolve_columns(raw, args)
    processor, model, base_model = _build_processor_and_model(args, label_names, is_image)
    num_channels = getattr(model.config, "num_channels", 3)
    processed = _preprocess(
        raw, args, processor, input_column, label_column, label_names, is_image, accelerator, num_channels
    )
    collate = _collator(args, processor, is_image, accelerator)
    logger.info(
        "Data: %d train, %d validation, %s test examples; %d classes.",
        len(processed["train"]),
        len(processed["validation"]),
        len(processed["test"]) if "test" in processed else "no",
        len(label_names),
    )
    train_dataloader = _loader(processed["train"], args.per_device_train_batch_size, collate, shuffle=True)
    eval_loaders = {
        split: _loader(processed[split], args.per_device_eval_batch_size, collate, shuffle=False)
        for split in ("validation", "test", "train_eval")
        if split in processed
    }
    measure_dataloader = _loader(processed["measure"], args.per_device_eval_batch_size, collate, shuffle=False)

    # ----- PATCHING: after the model exists, before the optimizer collects its parameters -----
    patch_model(
        model,
        head_temperature=args.head_temperature,
        attention_temperature=args.attention_temperature,
        learnable=args.learnable_temperature,
    )
    if args.use_lora:
        model = _wrap_lora(model, args)

    # ----- OPTIMIZER -----
    learning_rate = args.learning_rate
    if learning_rate is None:
        learning_rate = FROM_SCRATCH_LEARNING_RATE if base_model is None else FINETUNE_LEARNING_RATE
    optimizer = _make_optimizer(model, args.weight_decay, learning_rate, accelerator.device)

    # ----- SCHEDULER -----
    steps_per_epoch = math.ceil(
        math.ceil(len(train_dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # The prepared scheduler steps once per process at each optimizer step, hence the factor (as in
    # transformers' no_trainer examples).
    lr_scheduler = get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )

    # ----- PREPARE -----
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    # Each process reads its shard; measure_representations gathers the features, so every process gets the
    # ranks of all measurement samples.
    measure_dataloader = accelerator.prepare(measure_dataloader)
    # Recompute after sharding, because the loop iterates over the batches of one process.
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    run_name = output_dir.name or "attn_temp"
    _start_trackers(accelerator, args, run_name)
    history_path = output_dir / HISTORY_FILE

    # ----- RESUME -----
    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    checkpoint = resolve_checkpoint(args)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        completed_steps, starting_epoch, resume_batches = _checkpoint_start(
            checkpoint, steps_per_epoch, args.gradient_accumulation_steps
        )
        logger.info("Resumed from %s at step %d (epoch %d).", checkpoint, completed_steps, starting_epoch)
    elif accelerator.is_main_process and args.overwrite_output_dir and history_path.exists():
        # A new run in a reused folder starts a new history; the old file is kept beside it.
        os.replace(history_path, history_path.with_suffix(".jsonl.previous"))
    accelerator.wait_for_everyone()

    # ----- TRAIN -----
    measure_seconds = 0.0
    last_measurement: dict = {}
    last_measured_step = None
    # A resumed run keeps the measurement steps up to its checkpoint. Later ones belong to the interrupted part and are redone.
    measured_steps = [
        record["step"]
        for record in (read_jsonl(history_path) if completed_steps and history_path.exists() else [])
        if record.get("type") == "measurement" and record["step"] <= completed_steps
    ]

    def measure_point(step: int, epoch: int) -> None:
        # Every process must call this: the measurement gathers features across processes.
        nonlocal measure_seconds, last_measurement, last_measured_step
        report, seconds = _measure(model, measure_dataloader, accelerator, args)
        measure_seconds += seconds
        last_measured_step = step
        measured_steps.append(step)
        temperatures = get_temperatures(accelerator.unwrap_model(model))
        last_measurement = report
        record = {
            "type": "measurement",
            "step": step,
            "epoch": epoch,
            "seconds": seconds,
            "temperatures": temperatures,
            "report": report,
        }
        if accelerator.is_main_process:
            append_jsonl(history_path, record)
        accelerator.log(_flatten_for_trackers("rank", report), step=step)

    def save_checkpoint(name: str) -> None:
        accelerator.save_state(str(output_dir / name))
        if accelerator.is_main_process:
            restore_ordinary_modes((output_dir / name).glob("*.safetensors"))
        logger.info("Saved checkpoint %s.", output_dir / name)

    # Training time runs from the step-0 measurement to the final one, so measure_share is the share of it.
    train_started = time.perf_counter()
    if completed_steps == 0:
        measure_point(0, 0)
    progress = tqdm(
        range(max_train_steps),
        initial=completed_steps,
        disable=not accelerator.is_local_main_process,
        desc="Training",
    )
    window = torch.zeros(5, device=accelerator.device)
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == starting_epoch and resume_batches:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            temperature = _current_head_temperature(accelerator.unwrap_model(model))
            window[:4] += _batch_statistics(outputs.logits, batch["labels"], temperature)
            window[4] += loss.detach().float() * batch["labels"].numel()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)

            if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                totals = accelerator.reduce(window, reduction="sum")
                count = max(totals[1].item(), 1.0)
                values = {
                    "train/loss": totals[4].item() / count,
                    "train/accuracy": totals[0].item() / count,
                    "train/logits_norm_raw": totals[2].item() / count,
                    "train/logits_norm_effective": totals[3].item() / count,
                    "train/learning_rate": lr_scheduler.get_last_lr()[0],
                    "train/head_temperature": temperature,
                }
                progress.set_postfix(loss=f"{values['train/loss']:.3f}", acc=f"{values['train/accuracy']:.3f}")
                accelerator.log(values, step=completed_steps)
                window.zero_()
            if isinstance(args.measure_every, int) and completed_steps % args.measure_every == 0:
                measure_point(completed_steps, epoch)
            if isinstance(args.checkpointing_steps, int) and completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(f"step_{completed_steps}")
            if completed_steps >= max_train_steps:
                break

        if args.measure_every == "epoch" and completed_steps % steps_per_epoch == 0:
            measure_point(completed_steps, epoch)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(f"epoch_{epoch}")
        if completed_steps >= max_train_steps:
            break
    progress.close()

    # ----- MEASURE: final ranks and accuracies -----
    if last_measured_step != completed_steps:
        measure_point(completed_steps, num_epochs - 1)
    train_seconds = time.perf_counter() - train_started
    results = {split: evaluate(model, loader, accelerator) for split, loader in eval_loaders.items()}
    accelerator.log(
        {f"{split}/{key}": value for split, values in results.items() for key, value in values.items()},
        step=completed_steps,
    )
    if accelerator.is_main_process:
        append_jsonl(history_path, {"type": "evaluation", "step": completed_steps, **results})
    unwrapped = accelerator.unwrap_model(model)
    temperatures = get_temperatures(unwrapped)
    metrics = {
        "eval_accuracy": results["validation"]["accuracy"],
        "test_accuracy": results["test"]["accuracy"] if "test" in results else None,
        "train_accuracy": results["train_eval"]["accuracy"],
        "eval_loss": results["validation"]["loss"],
        "test_loss": results["test"]["loss"] if "test" in results else None,
        "logits_norm_raw": results["validation"]["logits_norm_raw"],
        "logits_norm_effective": results["validation"]["logits_norm_effective"],
        "evaluation": results,
        "temperatures": temperatures,
        "ranks": _summarize_report(last_measurement),
        "measured_steps": measured_steps,
        "representations": last_measurement,
        "completed_steps": completed_steps,
        "epochs": num_epochs,
        "num_processes": accelerator.num_processes,
        "learning_rate": learning_rate,
        "train_seconds": train_seconds,
        "measure_seconds": measure_seconds,
        "measure_share": measure_seconds / train_seconds if train_seconds > 0 else None,
        "label_names": label_names,
        "base_model": base_model,
        "dataset": args.dataset_name or args.train_file or (
            "fashion_mnist" if is_image else DEFAULT_TEXT_DATASET
        ),
        "task": "image-classification" if is_image else "text-classification",
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        "args": {key: value for key, value in sorted(vars(args).items()) if key != "hub_token"},
    }

    # ----- SAVE -----
    accelerator.wait_for_everyone()
    if args.use_lora:
        unwrapped = unwrapped.merge_and_unload()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, save_function=accelerator.save)
        restore_ordinary_modes(output_dir.glob("*.safetensors"))
        processor.save_pretrained(output_dir)
        write_json_atomic(output_dir / METRICS_FILE, metrics)
        _write_plots(output_dir, metrics)
        card = cards.build_model_card(output_dir, metrics)
        write_text_atomic(output_dir / CARD_FILE, str(card))
        logger.info("Model card written to %s.", output_dir / CARD_FILE)
    accelerator.wait_for_everyone()

    # ----- PUSH -----
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = args.hub_model_id or output_dir.resolve().name
        metrics["push"] = cards.push_to_hub(
            output_dir, repo_id, token=args.hub_token, dry_run=args.dry_run, private=args.hub_private_repo or None
        )
    return metrics


def _wrap_lora(model, args):
    """Wrap `model` in peft LoRA adapters; the head is trained in full (stage: patching, continued)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from .patching import find_head, patch_model

    head_name, _ = find_head(model)
    targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=[head_name.split(".")[-1]],
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"`--lora_target_modules` {args.lora_target_modules!r}: {err}") from err
    # get_peft_model freezes every non-adapter parameter, learnable temperatures included; re-enable them.
    patch_model(peft_model)
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _write_plots(output_dir: Path, metrics: dict) -> None:
    """Write the rank-per-layer plot of the final model and the rank-over-training plot from metrics.jsonl."""
    from .plotting import plot_rank_per_layer

    history = [record for record in read_jsonl(output_dir / HISTORY_FILE) if record.get("type") == "measurement"]
    title = _plot_title(metrics)
    plot_rank_per_layer(metrics["representations"], output_dir / RANK_PER_LAYER_PLOT, title=title)
    plot_rank_over_training(history, output_dir / RANK_OVER_TRAINING_PLOT, title=title)


def plot_rank_over_training(history: list[dict], path, *, title: str = "", rank: str = "numerical_rank") -> None:
    """Plot one line per layer of `rank` against the optimizer step, from measurement records, as a PNG.

    Args:
        history (`list[dict]`): `metrics.jsonl` records of type "measurement" (each with `step` and `report`).
        path: the PNG to write (atomically: a temporary file in the same folder, then a rename).
        title (`str`): figure title.
        rank (`str`): "numerical_rank", "effective_rank" or "stable_rank".
    """
    from .plotting import _save, plt

    records = sorted(history, key=lambda record: record["step"])
    layer_order = list(records[-1]["report"]["layers"]) if records else []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("viridis")(torch.linspace(0, 1, max(len(layer_order), 1)).tolist())
    for color, layer in zip(colors, layer_order):
        points = [
            (record["step"], record["report"]["layers"][layer].get(rank))
            for record in records
            if layer in record["report"]["layers"] and record["report"]["layers"][layer].get(rank) is not None
        ]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o", markersize=3, color=color, label=layer)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(rank.replace("_", " "))
    axes.set_title(title or f"{rank.replace('_', ' ')} over training")
    if layer_order:
        axes.legend(fontsize=7, ncol=2, loc="best")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def _plot_title(metrics: dict) -> str:
    temperatures = metrics["temperatures"]
    parts = [f"head T={temperatures.get('head_temperature')}"]
    attention = temperatures.get("attention_temperature") or []
    if any(value is not None for value in attention):
        labels = []
        for value in attention:
            if value is None:
                labels.append("-")
            elif isinstance(value, float):
                labels.append(f"{value:g}")
            else:
                labels.append(str(value))
        parts.append("attention T=" + ",".join(labels))
    return ", ".join(parts)

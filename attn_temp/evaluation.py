"""Evaluate a fine-tuned run for a temperature study: OOD transfer, OOD detection, compression, rank sensitivity.

`evaluate_run` loads a folder written by `scripts/finetune.py` (weights with their temperatures and the
tokenizer or image processor), extracts per-layer features of in-distribution and OOD data, and returns
plain numbers for `evaluation.json`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import ood
from .data import load_named_dataset
from .patching import load_patched

logger = logging.getLogger(__name__)

# The OOD data set probed for each in-distribution data set when none is given.
DEFAULT_OOD_DATASETS = {"wordnet_nouns": "wordnet_verbs", "fashion_mnist": "digits"}


def default_ood_dataset(dataset_name: str) -> str:
    """Return the OOD data set that pairs with a built-in in-distribution data set."""
    if dataset_name not in DEFAULT_OOD_DATASETS:
        raise ValueError(
            f"No default OOD data set for {dataset_name!r}; pass --ood_dataset_name "
            f"(built-in pairs: {DEFAULT_OOD_DATASETS})."
        )
    return DEFAULT_OOD_DATASETS[dataset_name]


def _is_image_model(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and not hasattr(config, "vocab_size")


def load_run_model(model_dir: str | os.PathLike):
    """Load a run's model with its temperatures, and its tokenizer or image processor."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(model_dir)
    if _is_image_model(config):
        model = load_patched(model_dir, model_class=AutoModelForImageClassification)
        processor = AutoImageProcessor.from_pretrained(model_dir)
        return model.eval(), processor, True
    model = load_patched(model_dir, model_class=AutoModelForSequenceClassification)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir), False


def _dataloader(split, processor, is_image: bool, *, max_length: int, batch_size: int):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, default_data_collator

    input_column = "image" if is_image else "text"

    def encode(batch):
        if is_image:
            encoded = {"pixel_values": processor(batch[input_column], return_tensors="np")["pixel_values"]}
        else:
            encoded = dict(processor(batch[input_column], truncation=True, max_length=max_length))
        encoded["labels"] = batch["label"]
        return encoded

    encoded = split.map(encode, batched=True, remove_columns=split.column_names)
    encoded.set_format("torch")
    collate = default_data_collator if is_image else DataCollatorWithPadding(processor)
    return DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _sample(split, count: int, seed: int):
    if count >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(count))


def evaluate_run(
    model_dir: str | os.PathLike,
    *,
    dataset_name: str,
    ood_dataset_name: str | None = None,
    probe_samples: int = 2000,
    test_samples: int = 1000,
    max_length: int = 64,
    batch_size: int = 64,
    accelerator=None,
    seed: int = 0,
) -> dict:
    """Measure what a trained model's temperature did to its features.

    Args:
        model_dir (`str`): a folder written by `scripts/finetune.py`.
        dataset_name (`str`): the in-distribution data set the model was trained on.
        ood_dataset_name (`str`, *optional*): the OOD data set; defaults to the built-in pair
            (WordNet verb glosses for noun glosses, scikit-learn digits for Fashion-MNIST).
        probe_samples (`int`): training samples of each linear probe, from the data set's train split.
        test_samples (`int`): test samples, from the test split (validation split when there is none).
        accelerator (*optional*): spreads feature extraction over processes; every process gets the result.

    Returns:
        `dict` with `ood_probe` (OOD probe accuracy per layer), `in_distribution_probe` (per layer),
        `ood_detection` (AUROC and FPR at 95% TPR for MSP, energy and NECO), `compression` (accuracy against
        the number of principal directions of the pooled features) and `rank_sensitivity`.
    """
    from .measure import extract_features

    ood_dataset_name = ood_dataset_name or default_ood_dataset(dataset_name)
    model, processor, is_image = load_run_model(model_dir)

    loaded = {}

    def features(name: str, split_name: str, count: int):
        if name not in loaded:
            loaded[name] = load_named_dataset(name)
        raw = loaded[name]
        split = raw[split_name] if split_name in raw else raw["validation"]
        loader = _dataloader(_sample(split, count, seed), processor, is_image, max_length=max_length, batch_size=batch_size)
        if accelerator is not None:
            loader = accelerator.prepare_data_loader(loader)
        return extract_features(model, loader, accelerator=accelerator)

    with torch.no_grad():
        in_train = features(dataset_name, "train", probe_samples)
        in_test = features(dataset_name, "test", test_samples)
        ood_train = features(ood_dataset_name, "train", probe_samples)
        ood_test = features(ood_dataset_name, "test", test_samples)

    # ----- OOD generalization: linear probes on frozen features of the OOD data set -----
    # Ridge-classifier probes: linear like logistic ones, about ten times faster on 2,000 x 384 features.
    ood_probe = ood.probe_layers(ood_train.features, ood_train.labels, ood_test.features, ood_test.labels, probe="ridge")
    in_probe = ood.probe_layers(in_train.features, in_train.labels, in_test.features, in_test.labels, probe="ridge")

    # ----- OOD detection: in-distribution test set against the OOD test set -----
    detection = ood.evaluate_ood_detection(
        in_test.effective_logits,
        ood_test.effective_logits,
        in_distribution_features=in_test.features["pooled"],
        ood_features=ood_test.features["pooled"],
        train_features=in_train.features["pooled"],
    )

    # ----- Compression of the pooled features, and sensitivity of their rank -----
    compression = ood.compression_curve(
        in_train.features["pooled"], in_train.labels, in_test.features["pooled"], in_test.labels
    )
    sensitivity = ood.rank_sensitivity(in_train.features["pooled"])

    return {
        "dataset_name": dataset_name,
        "ood_dataset_name": ood_dataset_name,
        "probe_samples": probe_samples,
        "test_samples": test_samples,
        "ood_probe": ood_probe,
        "in_distribution_probe": in_probe,
        "ood_detection": detection,
        "compression": compression.to_dict(),
        "rank_sensitivity": [row.to_dict() for row in sensitivity],
        "model_dir": str(Path(model_dir)),
    }

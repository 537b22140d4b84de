"""Per-layer representation measurement of a transformers model: rank, logits norm, attention entropy and
neural collapse, streamed over a dataloader.

`measure_representations` runs the model once over the data and, for every layer, feeds one pooled feature
vector per sample (or every non-padding token) into a `FeatureStatistics` accumulator, so memory does not
grow with the number of samples. `extract_features` runs the same forward pass and returns the features
themselves, for linear probes and OOD scores. Both use `_BatchFeatureReader`, which owns the forward pass,
the head hook, pooling and the distributed gathering.

Layer names, in model order: `embeddings`, `layer_0` ... `layer_{L-1}` (the `hidden_states` the model
returns with `output_hidden_states=True`), `pooled` (the input of the output head), `logits` (raw logits
z = returned logits * T), `effective_logits` (z / T, what the model returns) and `probabilities`
(softmax(z / T)).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import write_text_atomic
from .metrics import (
    DEFAULT_CENTER,
    DEFAULT_RANK_TOLERANCE,
    FeatureStatistics,
    Spectrum,
    nearest_class_center_mismatches,
)
from .patching import attention_implementation, find_head, get_temperatures, head_temperature, unwrap_model

logger = logging.getLogger(__name__)

# Path of the `evaluate` module that computes the same rank metrics from feature arrays:
# `evaluate.load(EVALUATE_MODULE_PATH)` works offline.
EVALUATE_MODULE_PATH = str(Path(__file__).resolve().parent / "evaluate_rank" / "rank.py")

POOLING_CHOICES = ("auto", "cls", "mean", "last")
HEAD_LAYERS = ("pooled", "logits", "effective_logits", "probabilities")

# A (d, d) float64 Gram matrix takes 8 d^2 bytes: 512 MiB at d = 8192. Wider features (a language model's
# vocabulary logits) only get their sample count and mean norm.
DEFAULT_MAX_GRAM_DIM = 8192

# Rows per read when NC4 replays the spilled pooled features.
_NC4_CHUNK_ROWS = 4096

# Forward arguments that the reader sets itself; a batch may not override them.
_RESERVED_FORWARD_ARGS = ("output_hidden_states", "output_attentions", "return_dict", "use_cache", "labels")


class SampleBoundWarning(UserWarning):
    """Warned when a layer has fewer samples than features, so its rank is bounded by the sample count."""


def layer_names(num_layers: int) -> list[str]:
    """Return the report's layer names in model order for a model with `num_layers` blocks."""
    return ["embeddings", *(f"layer_{i}" for i in range(num_layers)), *HEAD_LAYERS]


# ---------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------


def is_causal_model(model: nn.Module) -> bool:
    """Return whether the model's self-attention is causal (GPT-2, Llama), detected from its modules.

    transformers' attention modules carry `is_causal`; a config with `is_decoder=True` (BERT as a
    decoder) is causal too.
    """
    base = unwrap_model(model)
    if getattr(base.config, "is_decoder", False):
        return True
    return any(getattr(module, "is_causal", False) is True for module in base.modules())


def resolve_pooling(model: nn.Module, pooling: str) -> str:
    """Turn `pooling="auto"` into `"last"` for causal models and `"cls"` for encoders (BERT, ViT)."""
    if pooling not in POOLING_CHOICES:
        raise ValueError(f"`pooling` must be one of {POOLING_CHOICES}, got {pooling!r}.")
    if pooling != "auto":
        return pooling
    return "last" if is_causal_model(model) else "cls"


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (B, S, d) token features to (B, d) over the positions where `mask` (B, S) is true.

    `cls` takes the first non-padding token, `last` the last one (right or left padding both work) and
    `mean` averages the non-padding tokens.
    """
    if pooling == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if pooling == "cls":
        index = torch.where(mask, -positions, -mask.shape[1]).argmax(dim=1)
    elif pooling == "last":
        index = torch.where(mask, positions, -1).argmax(dim=1)
    else:
        raise ValueError(f"`pooling` must be 'cls', 'mean' or 'last' here, got {pooling!r}.")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _attention_entropy_sums(attentions: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Return (B, L): per sample and layer, the sum over non-padding queries of the head-mean entropy."""
    query_weights = mask.to(torch.float64)
    sums = []
    for probabilities in attentions:  # (B, H, S_query, S_key)
        # 0 log 0 = 0, so padded keys (probability exactly 0) add nothing. Per-row entropies in the
        # attention's float32 are exact to ~1e-7; the sums over rows are float64.
        entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=-1).mean(dim=1)  # (B, S_query)
        sums.append((entropy.to(torch.float64) * query_weights).sum(dim=1))
    return torch.stack(sums, dim=1)


# ---------------------------------------------------------------------------------------------------------
# The forward pass shared by measure_representations and extract_features
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Features of one batch after gathering: every tensor's rows are samples (or tokens)."""

    features: dict[str, torch.Tensor]
    num_samples: int
    labels: torch.Tensor | None = None
    # (B, L) per-sample entropy sums and (B,) non-padding query counts, for attention entropy.
    entropy_sums: torch.Tensor | None = None
    query_counts: torch.Tensor | None = None


def _slice_rows(value: Any, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:stop]
    if isinstance(value, dict):
        return {key: _slice_rows(item, stop) for key, item in value.items()}
    return value


class _BatchFeatureReader:
    """Run the model over a dataloader and yield gathered per-layer features batch by batch.

    It hooks the input of the output head, switches to eager attention for attention weights only
    while iterating, puts the model in eval mode, and restores all three afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        accelerator: Any,
        pooling: str,
        token_level: bool,
        attention_entropy: bool,
    ) -> None:
        self.model = unwrap_model(model)
        self.accelerator = accelerator
        self.pooling = resolve_pooling(self.model, pooling)
        self.token_level = token_level
        self.attention_entropy = attention_entropy
        if getattr(self.model.config, "is_encoder_decoder", False):
            raise ValueError(
                f"measure_representations supports encoder-only and decoder-only models, got the encoder-decoder "
                f"{type(self.model).__name__}. Measure its encoder on its own (`model.get_encoder()` wrapped "
                "in a model class) instead."
            )
        try:
            self.head_name, self.head = find_head(self.model)
        except ValueError:
            # A bare backbone (AutoModel): no logits, so `pooled` is the model's own pooled output.
            self.head_name, self.head = None, None
        self.forward_parameters = set(inspect.signature(self.model.forward).parameters)
        self.main_input = getattr(self.model, "main_input_name", "input_ids")
        self.distributed = accelerator is not None and accelerator.num_processes > 1
        self.head_inputs: list[torch.Tensor] = []
        self.temperature: torch.Tensor | float | None = None

    # ---- inputs -----------------------------------------------------------------------------------------

    def _model_inputs(self, batch: Any, batch_index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"Expected each batch to be a dict of tensors (as from a transformers data collator), got "
                f"{type(batch).__name__} in batch {batch_index}."
            )
        if self.main_input not in batch and "inputs_embeds" not in batch:
            raise ValueError(
                f"Batch {batch_index} is missing the key {self.main_input!r} that {type(self.model).__name__} "
                f"needs as input; the batch has keys {sorted(batch)}. Tokenize text into `input_ids` and "
                "`attention_mask`, or pass images as `pixel_values`."
            )
        device = next(self.model.parameters()).device
        inputs = {
            key: value.to(device)
            for key, value in batch.items()
            if isinstance(value, torch.Tensor) and key in self.forward_parameters and key not in _RESERVED_FORWARD_ARGS
        }
        labels = batch.get("labels", batch.get("label"))
        if isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point():
            labels = labels.to(device)
        else:
            # Token-level labels (language modelling) or no labels: no neural collapse.
            labels = None
        return inputs, labels

    # ---- hooks and model state ----------------------------------------------------------------------------

    def _capture_head_input(self, module, args, kwargs, output) -> None:
        value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.head_inputs.append(value.detach())

    def read(self, dataloader, max_samples: int | None) -> Iterator[_Batch]:
        """Yield one `_Batch` per batch of `dataloader`, after gathering, until `max_samples` samples."""
        if self.distributed:
            self._check_prepared(dataloader)
        was_training = self.model.training
        # No gradient steps happen during the pass, so a learnable temperature stays fixed.
        self.temperature = head_temperature(self.model)
        if isinstance(self.temperature, torch.Tensor):
            self.temperature = self.temperature.detach()
        handle = None
        if self.head is not None:
            handle = self.head.register_forward_hook(self._capture_head_input, with_kwargs=True)
        self.model.eval()
        try:
            if self.attention_entropy:
                with attention_implementation(self.model, "eager"):
                    yield from self._read_batches(dataloader, max_samples)
            else:
                yield from self._read_batches(dataloader, max_samples)
        finally:
            if handle is not None:
                handle.remove()
            self.model.train(was_training)
            self.head_inputs.clear()

    def _check_prepared(self, dataloader) -> None:
        from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

        if not isinstance(dataloader, (DataLoaderShard, DataLoaderDispatcher)):
            raise ValueError(
                f"With an Accelerator over {self.accelerator.num_processes} processes, the dataloader must be "
                f"prepared by it so that each process reads its own shard, got {type(dataloader).__name__}. "
                "Pass `accelerator.prepare(dataloader)`."
            )

    # ---- one batch ------------------------------------------------------------------------------------------

    def _read_batches(self, dataloader, max_samples: int | None) -> Iterator[_Batch]:
        seen = 0
        for batch_index, batch in enumerate(dataloader):
            inputs, labels = self._model_inputs(batch, batch_index)
            payload = self._forward(inputs, labels)
            if self.distributed:
                payload = self._gather(payload)

            num_samples = payload["num_samples"].shape[0]
            if max_samples is not None and seen + num_samples > max_samples:
                num_samples = max_samples - seen
                payload = _slice_rows(payload, num_samples)
            seen += num_samples
            if num_samples:
                yield self._to_rows(payload, batch_index)
            if max_samples is not None and seen >= max_samples:
                break

    def _forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> dict[str, Any]:
        self.head_inputs.clear()
        with torch.no_grad():
            outputs = self.model(
                **inputs,
                output_hidden_states=True,
                output_attentions=self.attention_entropy,
                return_dict=True,
            )
        hidden_states = outputs.hidden_states
        if hidden_states is None:
            raise ValueError(
                f"{type(self.model).__name__} returned no `hidden_states` with output_hidden_states=True; "
                "measure_representations needs them for the per-layer features."
            )
        batch_size, sequence_length = hidden_states[0].shape[:2]
        mask = inputs.get("attention_mask")
        if mask is None or mask.shape[-1] != sequence_length:
            # No padding (images) or a mask over other positions: every position is a token.
            mask = torch.ones(batch_size, sequence_length, dtype=torch.bool, device=hidden_states[0].device)
        mask = mask.to(torch.bool)

        tokens: dict[str, torch.Tensor] = {"embeddings": hidden_states[0]}
        for index, hidden in enumerate(hidden_states[1:]):
            tokens[f"layer_{index}"] = hidden
        tokens.update(self._head_tensors(outputs, tokens))

        payload: dict[str, Any] = {"features": {}, "num_samples": torch.zeros(batch_size, device=mask.device)}
        for name, value in tokens.items():
            value = value.float()
            if value.dim() == 3 and not self.token_level:
                value = pool_tokens(value, mask, self.pooling)
            payload["features"][name] = value
        if self.token_level:
            payload["mask"] = mask
        if labels is not None:
            payload["labels"] = labels
        if self.attention_entropy:
            # NOTE: output_attentions keeps every layer's (B, H, S, S) weights until the forward pass ends:
            # 4 B H S^2 L bytes per batch (4.8 GB at B=32, H=12, S=512, L=12). Use smaller batches there.
            payload["entropy_sums"] = _attention_entropy_sums(outputs.attentions, mask)
            payload["query_counts"] = mask.sum(dim=1).to(torch.float64)
        return payload

    def _head_tensors(self, outputs, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = getattr(outputs, "logits", None)
        if self.head is None or logits is None:
            pooled = getattr(outputs, "pooler_output", None)
            return {"pooled": pooled if pooled is not None else tokens[next(reversed(tokens))]}
        if len(self.head_inputs) != 1:
            raise RuntimeError(
                f"Expected the output head {self.head_name} to run once per forward pass, it ran "
                f"{len(self.head_inputs)} times; measure_representations cannot tell which call made the logits."
            )
        temperature = self.temperature
        raw = logits if temperature is None else logits * temperature
        return {
            "pooled": self.head_inputs[0],
            "logits": raw,
            "effective_logits": logits,
            "probabilities": logits.float().softmax(dim=-1),
        }

    def _gather(self, payload: dict[str, Any]) -> dict[str, Any]:
        accelerator = self.accelerator
        if self.token_level:
            # Sequence lengths differ between processes: pad to the longest before gathering.
            payload["mask"] = accelerator.pad_across_processes(payload["mask"], dim=1)
            for name, value in payload["features"].items():
                if value.dim() == 3:
                    payload["features"][name] = accelerator.pad_across_processes(value, dim=1)
        # gather_for_metrics drops the samples that the even-batches padding of the last batch repeated.
        return accelerator.gather_for_metrics(payload)

    def _to_rows(self, payload: dict[str, Any], batch_index: int) -> _Batch:
        mask = payload.get("mask")
        features = {}
        for name, value in payload["features"].items():
            if value.dim() == 3:
                value = value[mask[:, : value.shape[1]]] if mask is not None else value.flatten(0, 1)
            if not torch.isfinite(value).all():
                bad = (~torch.isfinite(value)).sum().item()
                raise ValueError(
                    f"Layer {name!r} produced {bad} NaN or inf values in batch {batch_index}. Check the model's "
                    "weights and inputs (a NaN weight, an overflow in float16); rank needs finite features."
                )
            features[name] = value
        return _Batch(
            features=features,
            num_samples=payload["num_samples"].shape[0],
            labels=payload.get("labels"),
            entropy_sums=payload.get("entropy_sums"),
            query_counts=payload.get("query_counts"),
        )

    # ---- head facts ---------------------------------------------------------------------------------------------

    def classifier_weight(self, feature_dim: int) -> torch.Tensor | None:
        """Return the (C, feature_dim) weight of a linear head, or None if the head is something else."""
        weight = getattr(self.head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        if getattr(self.head, "nf", None) is not None:  # GPT-2's Conv1D stores (in, out)
            weight = weight.T
        return weight.detach() if weight.shape[1] == feature_dim else None


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LayerResult:
    """Rank metrics of one layer's features."""

    name: str
    num_samples: int
    feature_dim: int
    # Mean L2 norm of the feature rows; for `logits` and `effective_logits` it is the logits norm.
    mean_norm: float
    numerical_rank: int | None
    effective_rank: float | None
    stable_rank: float | None
    # Full float64 spectrum in descending order; None for layers wider than `max_gram_dim`.
    singular_values: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_spectrum(cls, name: str, spectrum: Spectrum) -> LayerResult:
        return cls(
            name=name,
            num_samples=spectrum.num_samples,
            feature_dim=spectrum.feature_dim,
            mean_norm=spectrum.mean_norm,
            numerical_rank=spectrum.numerical_rank,
            effective_rank=spectrum.effective_rank,
            stable_rank=spectrum.stable_rank,
            singular_values=spectrum.singular_values,
        )

    def to_dict(self, top_k: int, full_spectrum: bool = False) -> dict[str, Any]:
        values = None if self.singular_values is None else self.singular_values.tolist()
        result = {
            "numerical_rank": self.numerical_rank,
            "effective_rank": self.effective_rank,
            "stable_rank": self.stable_rank,
            "top_singular_values": None if values is None else values[:top_k],
            "num_samples": self.num_samples,
            "feature_dim": self.feature_dim,
            "mean_norm": self.mean_norm,
        }
        if full_spectrum:
            result["singular_values"] = values
        return result


@dataclass
class RepresentationReport:
    """Result of `measure_representations`; `to_dict()` is JSON-serialisable."""

    # Layer name -> metrics, in model order (see `layer_names`).
    layers: dict[str, LayerResult]
    # {"raw": mean ||z||, "effective": mean ||z / T||}; None without a head.
    logits_norm: dict[str, float] | None
    # Layer name -> mean attention entropy in nats; None when not measured.
    attention_entropy: dict[str, float] | None
    # nc1 ... nc4 and num_classes; None without integer labels or with fewer than 2 classes.
    neural_collapse: dict[str, Any] | None
    # `attn_temp.get_temperatures(model)` at measurement time.
    temperatures: dict[str, Any]
    # Settings the report was measured with (tolerance, centring, pooling, sample count, model).
    settings: dict[str, Any]

    def to_dict(self, *, full_spectrum: bool = False) -> dict[str, Any]:
        """Return the report as plain Python values; `full_spectrum` adds every singular value per layer."""
        top_k = self.settings["top_k_singular_values"]
        return {
            "settings": dict(self.settings),
            "temperatures": self.temperatures,
            "layers": {name: layer.to_dict(top_k, full_spectrum) for name, layer in self.layers.items()},
            "logits_norm": self.logits_norm,
            "attention_entropy": self.attention_entropy,
            "neural_collapse": self.neural_collapse,
        }

    def save_json(self, path: str | os.PathLike, *, full_spectrum: bool = False) -> None:
        """Write `to_dict()` as JSON, atomically (a temporary file in the same folder, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_dict(full_spectrum=full_spectrum), indent=2))


# ---------------------------------------------------------------------------------------------------------
# measure_representations
# ---------------------------------------------------------------------------------------------------------


def _validate_common(max_samples: int | None) -> None:
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples!r}.")


class _NearestClassCenterSpill:
    """Pooled features and predicted labels written to temporary files, for NC4's second pass.

    NC4 compares each sample's predicted label with its nearest class mean, and the means are final only
    after the last batch. Keeping the features on disk keeps RAM flat. The files are deleted on close.
    """

    def __init__(self) -> None:
        self.features_file = tempfile.TemporaryFile()
        self.predictions_file = tempfile.TemporaryFile()
        self.feature_dim: int | None = None

    def write(self, features: torch.Tensor, predictions: torch.Tensor) -> None:
        self.feature_dim = features.shape[1]
        self.features_file.write(features.detach().to("cpu", torch.float32).numpy().tobytes())
        self.predictions_file.write(predictions.detach().to("cpu", torch.int64).numpy().tobytes())

    def count_mismatches(self, means: torch.Tensor, mean_labels: torch.Tensor) -> int:
        self.features_file.seek(0)
        self.predictions_file.seek(0)
        mismatches = 0
        row_bytes = self.feature_dim * 4
        while chunk := self.features_file.read(_NC4_CHUNK_ROWS * row_bytes):
            features = torch.from_numpy(np.frombuffer(chunk, dtype=np.float32).reshape(-1, self.feature_dim).copy())
            raw = self.predictions_file.read(features.shape[0] * 8)
            predictions = torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy())
            mismatches += nearest_class_center_mismatches(features, predictions, means, mean_labels)
        return mismatches

    def close(self) -> None:
        self.features_file.close()
        self.predictions_file.close()


class _ReportAccumulator:
    """Per-layer statistics, attention entropy sums and the NC4 spill of one measurement pass."""

    def __init__(self, *, rank_tolerance: float, center: bool, max_gram_dim: int) -> None:
        self.rank_tolerance = rank_tolerance
        self.center = center
        self.max_gram_dim = max_gram_dim
        self.statistics: dict[str, FeatureStatistics] = {}
        self.num_samples = 0
        # (L,) float64 sums over samples of the per-sample entropy sums, and the number of queries.
        self.entropy_sums: torch.Tensor | None = None
        self.query_count = 0.0
        # Neural collapse needs a label for every pooled row of every batch.
        self.labelled = True
        self.spill: _NearestClassCenterSpill | None = None

    def add(self, batch: _Batch) -> None:
        self.num_samples += batch.num_samples
        pooled_rows_are_samples = batch.features["pooled"].shape[0] == batch.num_samples
        self.labelled = self.labelled and batch.labels is not None and pooled_rows_are_samples
        for name, rows in batch.features.items():
            if name not in self.statistics:
                self.statistics[name] = self._new_statistics(name, rows.shape[1])
            statistics = self.statistics[name]
            with_labels = name == "pooled" and self.labelled and statistics.track_spectrum
            statistics.update(rows, batch.labels if with_labels else None)
        if self.labelled and "logits" in batch.features:
            self.spill = self.spill or _NearestClassCenterSpill()
            self.spill.write(batch.features["pooled"], batch.features["effective_logits"].argmax(dim=1))
        if batch.entropy_sums is not None:
            sums = batch.entropy_sums.sum(dim=0)
            self.entropy_sums = sums if self.entropy_sums is None else self.entropy_sums + sums
            self.query_count += float(batch.query_counts.sum().item())

    def _new_statistics(self, name: str, feature_dim: int) -> FeatureStatistics:
        track = feature_dim <= self.max_gram_dim
        if not track:
            logger.warning(
                "Layer %s has %d features, more than max_gram_dim=%d: only its sample count and mean norm are "
                "measured. Raise `max_gram_dim` to measure its rank (the Gram matrix takes 8 d^2 bytes).",
                name,
                feature_dim,
                self.max_gram_dim,
            )
        return FeatureStatistics(rank_tolerance=self.rank_tolerance, center=self.center, track_spectrum=track)

    def neural_collapse(self, reader: _BatchFeatureReader) -> dict[str, Any] | None:
        """Compute NC1 to NC4 on the pooled features, or return None without labels for every sample."""
        pooled = self.statistics["pooled"]
        counts = pooled.class_counts
        if not self.labelled or counts is None:
            if counts is not None:
                logger.info("Neural collapse skipped: not every batch carried integer labels for every sample.")
            return None
        if int((counts > 0).sum().item()) < 2:
            logger.info("Neural collapse skipped: the labels name fewer than 2 classes.")
            return None
        weight = reader.classifier_weight(pooled.feature_dim) if reader.head is not None else None
        if weight is not None and weight.shape[0] < counts.shape[0]:
            logger.warning(
                "Neural collapse NC3 skipped: labels go up to %d but the head has %d classes.",
                counts.shape[0] - 1,
                weight.shape[0],
            )
            weight = None
        result = dict(pooled.compute_neural_collapse(classifier_weight=weight))
        result["nc4"] = None
        if self.spill is not None:
            means, mean_labels = pooled.class_means()
            result["nc4"] = self.spill.count_mismatches(means, mean_labels) / pooled.num_samples
        return result

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()


def measure_representations(
    model: nn.Module,
    dataloader,
    *,
    accelerator: Any = None,
    rank_tolerance: float = DEFAULT_RANK_TOLERANCE,
    center: bool = DEFAULT_CENTER,
    pooling: str = "auto",
    token_level: bool = False,
    max_samples: int | None = None,
    attention_entropy: bool = True,
    top_k_singular_values: int = 10,
    max_gram_dim: int = DEFAULT_MAX_GRAM_DIM,
) -> RepresentationReport:
    """Measure rank, logits norm, attention entropy and neural collapse at every layer, in one pass.

    For each layer the features of all samples form a matrix X (N x d) that is never stored: float64 sums
    and Gram matrices are accumulated instead, so memory is O(L d^2) whatever N is. The spectrum comes
    from the Gram matrix at the end and matches `torch.linalg.svdvals` of the materialised matrix (see
    `attn_temp.metrics`). Per layer the report has:

    - numerical rank #{k : sigma_k > rank_tolerance * sigma_1},
    - effective rank exp(-sum p_k log p_k) with p_k = sigma_k / sum sigma (RankMe),
    - stable rank sum sigma_k^2 / sigma_1^2,
    - the top singular values, the sample count, the feature dimension and the mean row norm.

    The report also has the logits norm (mean per-sample L2 norm of the raw logits z and of z / T) and
    the attention entropy per layer. That is the mean over heads and non-padding queries of
    -sum_k p_k log p_k, in nats, read with eager attention that is switched back afterwards. When batches carry integer
    `labels`, it has NC1 to NC4 on the pooled features.

    Args:
        model (`nn.Module`): a transformers model (BERT, ViT, GPT-2, Llama, ...), patched or not; a peft
            or DDP wrapper is unwrapped. Its training mode is restored afterwards.
        dataloader: batches as dicts with `input_ids` or `pixel_values`, optional `attention_mask` and
            optional `labels` (integer class labels give neural collapse).
        accelerator (`accelerate.Accelerator`, *optional*): over several processes, pass the dataloader
            after `accelerator.prepare`. Per-batch features are gathered with `gather_for_metrics`, so
            every process accumulates the same samples, each counted once, and gets the same report.
        rank_tolerance (`float`): gamma of the numerical rank. Default 1e-3.
        center (`bool`): measure the centred features (covariance). Default True: rank of the feature
            covariance, as in the Tunnel Effect measurements that the tolerance comes from.
        pooling (`str`): `"cls"` (first non-padding token), `"mean"` (over non-padding tokens), `"last"`
            (last non-padding token) or `"auto"`: `"last"` for causal models, `"cls"` otherwise (ViT too).
            Head inputs that are already one vector per sample (BERT's pooler, ViT's CLS) are used as is.
        token_level (`bool`): use every non-padding token of every layer as a row instead of pooling.
        max_samples (`int`, *optional*): stop after this many samples (over all processes).
        attention_entropy (`bool`): measure attention entropy. Needs an eager forward pass, which is
            slower than SDPA on long sequences. Default True.
        top_k_singular_values (`int`): how many singular values `to_dict()` lists per layer.
        max_gram_dim (`int`): layers wider than this (vocabulary logits) get only sample count and mean
            norm, because their Gram matrix would take 8 d^2 bytes. Default 8192.

    Returns:
        `RepresentationReport`.

    Raises:
        ValueError: an empty dataloader, a batch without the model's input key, NaN or inf features (the
            message names the layer), or invalid arguments.

    Warns:
        SampleBoundWarning: a layer has fewer samples than features, so its rank is at most the sample
            count (minus one when centred).

    Example:
        >>> report = measure_representations(model, dataloader)  # doctest: +SKIP
        >>> report.layers["layer_5"].numerical_rank  # doctest: +SKIP
        >>> report.save_json("rank.json")  # doctest: +SKIP
    """
    if not 0.0 < rank_tolerance < 1.0:
        raise ValueError(f"`rank_tolerance` must be in (0, 1), got {rank_tolerance}. The default is 1e-3.")
    if not isinstance(top_k_singular_values, int) or top_k_singular_values < 1:
        raise ValueError(f"`top_k_singular_values` must be a positive integer, got {top_k_singular_values!r}.")
    if max_gram_dim < 1:
        raise ValueError(f"`max_gram_dim` must be positive, got {max_gram_dim}.")
    _validate_common(max_samples)

    reader = _BatchFeatureReader(
        model, accelerator=accelerator, pooling=pooling, token_level=token_level, attention_entropy=attention_entropy
    )
    accumulator = _ReportAccumulator(rank_tolerance=rank_tolerance, center=center, max_gram_dim=max_gram_dim)
    try:
        # closing() restores the model (backend, hook, training mode) as soon as the loop ends, even when
        # an error raised in the loop keeps the generator alive in its traceback.
        with contextlib.closing(reader.read(dataloader, max_samples)) as batches:
            for batch in batches:
                accumulator.add(batch)
        if accumulator.num_samples == 0:
            raise ValueError(
                "The dataloader yielded no samples. Pass a dataloader over a non-empty dataset "
                "(with `drop_last=True`, the dataset must hold at least one full batch)."
            )
        layers = {name: LayerResult.from_spectrum(name, stats.compute()) for name, stats in accumulator.statistics.items()}
        _warn_sample_bound(layers, center)
        neural = accumulator.neural_collapse(reader)
    finally:
        accumulator.close()

    logits_norm = None
    if "logits" in layers:
        logits_norm = {"raw": layers["logits"].mean_norm, "effective": layers["effective_logits"].mean_norm}
    entropy = None
    if accumulator.entropy_sums is not None:
        entropy = {
            f"layer_{i}": value / accumulator.query_count for i, value in enumerate(accumulator.entropy_sums.tolist())
        }

    settings = {
        "rank_tolerance": rank_tolerance,
        "center": center,
        "pooling": reader.pooling,
        "token_level": token_level,
        "num_samples": accumulator.num_samples,
        "top_k_singular_values": top_k_singular_values,
        "model_class": type(reader.model).__name__,
        "model_type": getattr(reader.model.config, "model_type", None),
        "num_processes": 1 if accelerator is None else accelerator.num_processes,
    }
    return RepresentationReport(
        layers=layers,
        logits_norm=logits_norm,
        attention_entropy=entropy,
        neural_collapse=neural,
        temperatures=get_temperatures(reader.model),
        settings=settings,
    )


def _warn_sample_bound(layers: dict[str, LayerResult], center: bool) -> None:
    bounded = [f"{name} ({layer.num_samples} < {layer.feature_dim})" for name, layer in layers.items()
               if layer.numerical_rank is not None and layer.num_samples < layer.feature_dim]
    if bounded:
        bound = "the sample count minus one (centred)" if center else "the sample count"
        warnings.warn(
            f"Fewer samples than features in {', '.join(bounded)}: rank there is at most {bound}, so it "
            "measures the data size, not the representation. Measure more samples (`max_samples`, or "
            "`--measure_samples` in scripts/finetune.py) for a meaningful rank.",
            SampleBoundWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------
# extract_features
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ExtractedFeatures:
    """Materialised pooled features of every layer, from `extract_features`."""

    # Layer name -> (N, d) float32 CPU tensor; the same names as `RepresentationReport.layers`.
    features: dict[str, torch.Tensor]
    # (N,) integer labels, or None when the batches had none.
    labels: torch.Tensor | None
    # (N, C) raw logits z and effective logits z / T, or None for a model without a head.
    logits: torch.Tensor | None
    effective_logits: torch.Tensor | None


def extract_features(
    model: nn.Module,
    dataloader,
    *,
    accelerator: Any = None,
    pooling: str = "auto",
    max_samples: int | None = None,
) -> ExtractedFeatures:
    """Return every layer's pooled features, the labels and the raw and effective logits, materialised.

    The forward pass, pooling and distributed gathering are those of `measure_representations` (same
    layer names and `pooling` choices); memory grows with the number of samples. Under an Accelerator every
    process gets all samples, each once.
    """
    _validate_common(max_samples)
    reader = _BatchFeatureReader(model, accelerator=accelerator, pooling=pooling, token_level=False, attention_entropy=False)
    chunks: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    all_labelled = True
    with contextlib.closing(reader.read(dataloader, max_samples)) as batches:
        for batch in batches:
            for name, rows in batch.features.items():
                chunks.setdefault(name, []).append(rows.cpu())
            all_labelled = all_labelled and batch.labels is not None
            if batch.labels is not None:
                labels.append(batch.labels.cpu())
    if not chunks:
        raise ValueError("The dataloader yielded no samples. Pass a dataloader over a non-empty dataset.")
    features = {name: torch.cat(parts) for name, parts in chunks.items()}
    return ExtractedFeatures(
        features=features,
        labels=torch.cat(labels) if all_labelled and labels else None,
        logits=features.get("logits"),
        effective_logits=features.get("effective_logits"),
    )

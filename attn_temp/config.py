"""Validated temperature settings, and their form in a model's config.json."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

# Key under which the settings live in `PretrainedConfig`, and so in config.json.
CONFIG_KEY = "attn_temp"


def validate_temperature(name: str, value) -> float:
    """Return `value` as a float, or raise ValueError unless it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive finite number, got {value!r}. "
            "Use 1.0 for the ordinary softmax, a value above 1 to flatten it, below 1 to sharpen it."
        )
    return value


def normalize_attention_temperature(value, num_layers: int) -> list[float | None]:
    """Expand a float, a per-layer sequence or a {layer_index: T} mapping into one entry per layer.

    Layers without a temperature get None and keep the model's own attention.
    """
    if value is None:
        return [None] * num_layers
    if isinstance(value, Mapping):
        per_layer: list[float | None] = [None] * num_layers
        for layer, temperature in value.items():
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise ValueError(f"`attention_temperature` keys must be layer indices, got {layer!r}.")
            if not 0 <= layer < num_layers:
                raise ValueError(
                    f"`attention_temperature` names layer {layer}, but the model has {num_layers} attention layers "
                    f"(valid indices 0 to {num_layers - 1})."
                )
            per_layer[int(layer)] = validate_temperature(f"attention_temperature[{layer}]", temperature)
        return per_layer
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_layers:
            raise ValueError(
                f"`attention_temperature` has {len(value)} values, but the model has {num_layers} attention layers. "
                "Pass one value per layer, a single float for all layers, or a {layer_index: T} mapping."
            )
        return [
            None if temperature is None else validate_temperature(f"attention_temperature[{i}]", temperature)
            for i, temperature in enumerate(value)
        ]
    return [validate_temperature("attention_temperature", value)] * num_layers


@dataclass
class TemperatureConfig:
    """The temperatures that `patch_model` applies, as stored under `config.attn_temp`.

    Args:
        head_temperature (`float` or `None`): T of the output head; the model's logits become logits / T.
            None leaves the head alone.
        attention_temperature (`list`): one entry per attention layer, a float or None (layer left alone).
        learnable (`bool`): whether the temperatures are trainable parameters. Then the values here are the
            initial ones, and the trained values are stored in the weights as `*.attn_temp_log_temperature`.
        per_head (`bool`): with `learnable`, one attention temperature per head instead of one per layer.
    """

    head_temperature: float | None = None
    attention_temperature: list[float | None] = field(default_factory=list)
    learnable: bool = False
    per_head: bool = False

    def __post_init__(self):
        if self.head_temperature is not None:
            self.head_temperature = validate_temperature("head_temperature", self.head_temperature)
        if not isinstance(self.learnable, bool):
            raise ValueError(f"`learnable` must be True or False, got {self.learnable!r}.")
        if not isinstance(self.per_head, bool):
            raise ValueError(f"`per_head` must be True or False, got {self.per_head!r}.")
        if self.per_head and not self.learnable:
            raise ValueError(
                "`per_head=True` needs `learnable=True`: fixed temperatures are set per layer. "
                "Pass learnable=True, or drop per_head."
            )

    @property
    def is_empty(self) -> bool:
        return self.head_temperature is None and all(t is None for t in self.attention_temperature)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping, num_layers: int) -> TemperatureConfig:
        """Read the settings from a config dict, raising ValueError on a corrupt entry."""
        if not isinstance(data, Mapping):
            raise ValueError(f"`config.{CONFIG_KEY}` must be a dict, got {data!r}. The checkpoint's config.json is corrupt.")
        unknown = set(data) - {"head_temperature", "attention_temperature", "learnable", "per_head"}
        if unknown:
            raise ValueError(f"`config.{CONFIG_KEY}` has unknown keys {sorted(unknown)}; this checkpoint was not written by attn_temp.")
        attention = data.get("attention_temperature") or None
        return cls(
            head_temperature=data.get("head_temperature"),
            attention_temperature=normalize_attention_temperature(attention, num_layers),
            learnable=data.get("learnable", False),
            per_head=data.get("per_head", False),
        )

"""Put a temperature softmax, softmax(z / T), into a transformers model's output head and attention layers.

Attention. transformers' attention modules pass `scaling=self.scaling` to every backend (eager, sdpa, flex,
flash), so a fixed temperature T is applied by setting `scaling = base_scaling / T` on each module:
softmax(Q K^T * scaling / T) costs no extra kernel on any backend. A learnable temperature must carry a
gradient, which a Python float cannot, so learnable layers switch the model to an attention function
registered under `attn_temp_<backend>` that multiplies the query by exp(-log T) and then calls the backend.

Head. A forward hook on the output module divides its output by T, so the logits the model returns and the
loss it computes inside `forward` both see softmax_T.

The settings are stored in `config.attn_temp`, so `save_pretrained` and `from_pretrained` round-trip them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .config import CONFIG_KEY, TemperatureConfig, normalize_attention_temperature

logger = logging.getLogger(__name__)

# Attributes that attn_temp adds to patched modules; all of them share this prefix.
BASE_SCALING = "attn_temp_base_scaling"
FIXED_TEMPERATURE = "attn_temp_temperature"
LOG_TEMPERATURE = "attn_temp_log_temperature"
IMPLEMENTATION_PREFIX = "attn_temp_"

# Path components that peft inserts between a wrapper and the module it wraps.
_PEFT_INNER_COMPONENTS = ("base_layer", "original_module", "modules_to_save")


class UnsupportedModelError(ValueError):
    """Raised when attention temperature is requested for a model whose attention bypasses transformers'
    attention interface."""


# ---------------------------------------------------------------------------------------------------------------
# Finding the parts of a model
# ---------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """Return the transformers model inside a peft or accelerate/DDP wrapper."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"attn_temp patches transformers models (PreTrainedModel), got {type(model).__name__}. "
            "Pass the model returned by `AutoModel*.from_pretrained` or `from_config`, or a peft model wrapping one."
        )
    return model


def _layer_index(name: str, module: nn.Module) -> int | None:
    layer_idx = getattr(module, "layer_idx", None)
    if isinstance(layer_idx, int) and not isinstance(layer_idx, bool):
        return layer_idx
    # Blocks live in a ModuleList, so the first numeric path component is the block index.
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def find_attention_modules(model: nn.Module) -> dict[int, list[nn.Module]]:
    """Map each layer index to the attention modules of that layer.

    An attention module is one with a float `scaling` attribute, the value transformers' attention modules pass
    to the attention interface. Cross-attention modules of a layer share that layer's temperature.
    """
    base = unwrap_model(model)
    layers: dict[int, list[nn.Module]] = {}
    for name, module in base.named_modules():
        scaling = getattr(module, BASE_SCALING, getattr(module, "scaling", None))
        if not isinstance(scaling, float) or isinstance(module, PreTrainedModel):
            continue
        index = _layer_index(name, module)
        if index is None:
            logger.warning("Skipping attention module %s: no layer index in its name.", name)
            continue
        layers.setdefault(index, []).append(module)
    return dict(sorted(layers.items()))


def supports_attention_temperature(model: nn.Module) -> bool:
    """Check whether the model routes attention through transformers' attention interface."""
    base = unwrap_model(model)
    return bool(type(base)._can_set_attn_implementation()) and bool(find_attention_modules(base))


def _strip_peft_path(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _PEFT_INNER_COMPONENTS:
            return ".".join(parts[:i])
    return name


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Return the qualified name and module of the output head, the module whose output is the logits.

    A language model's head is its output embeddings. For a classifier it is the last linear module whose
    output size is `config.num_labels`, which also finds two-layer heads (RoBERTa's `out_proj`). Under peft,
    the wrapper is returned, so adapters and `modules_to_save` copies are inside the scaled output.
    """
    base = unwrap_model(model)
    named = dict(base.named_modules())
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        name = next(n for n, m in named.items() if m is head)
        name = _strip_peft_path(name)
        return name, named[name]

    num_labels = getattr(base.config, "num_labels", None)
    candidates = [
        name
        for name, module in named.items()
        if len(list(module.children())) == 0
        and (getattr(module, "out_features", None) == num_labels or getattr(module, "nf", None) == num_labels)
    ]
    if not candidates:
        raise ValueError(
            f"No output head found in {type(base).__name__}: no output embeddings and no linear layer with "
            f"num_labels={num_labels} outputs. Head temperature needs a classification or language-model head "
            "(e.g. AutoModelForSequenceClassification, AutoModelForCausalLM); attention temperature works without one."
        )
    name = _strip_peft_path(candidates[-1])
    return name, named[name]


def _module_temperature(module: nn.Module) -> torch.Tensor | float | None:
    log_temperature = getattr(module, LOG_TEMPERATURE, None)
    if log_temperature is not None:
        return log_temperature.exp()
    return getattr(module, FIXED_TEMPERATURE, None)


def head_temperature(model: nn.Module) -> torch.Tensor | float | None:
    """Return the current head temperature: a tensor when learnable, a float when fixed, None when unpatched."""
    base = unwrap_model(model)
    try:
        _, head = find_head(base)
    except ValueError:
        return None
    hooked = [(name, module) for name, module in head.named_modules() if _scale_head_output in module._forward_hooks.values()]
    # Patched before peft: both the frozen original and the trained `modules_to_save` copy carry the hook.
    in_use = [(name, module) for name, module in hooked if "original_module" not in name.split(".")]
    hooked = in_use or hooked
    return _module_temperature(hooked[-1][1]) if hooked else None


# ---------------------------------------------------------------------------------------------------------------
# The patched computations
# ---------------------------------------------------------------------------------------------------------------


def _scale_head_output(module, args, output):
    temperature = _module_temperature(module)
    if temperature is None:
        return output
    return output / temperature


def _base_attention_function(module: nn.Module, backend: str):
    if backend == "eager":
        # Each model file defines its own eager function (GPT-2's differs from BERT's); the module's file has it.
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward in its model file.")
        return function
    return ALL_ATTENTION_FUNCTIONS[backend]


def _make_learnable_attention(backend: str):
    def attention_with_temperature(module, query, key, value, attention_mask, scaling=None, **kwargs):
        log_temperature = getattr(module, LOG_TEMPERATURE, None)
        if log_temperature is not None:
            # softmax(Q K^T * scaling / T) == softmax((Q / T) K^T * scaling); per-head T broadcasts over
            # query of shape (batch, heads, queries, head_dim).
            inverse = torch.exp(-log_temperature).to(query.dtype)
            if inverse.ndim == 1:
                inverse = inverse.view(1, -1, 1, 1)
            query = query * inverse
        function = _base_attention_function(module, backend)
        return function(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    attention_with_temperature.__name__ = f"{IMPLEMENTATION_PREFIX}{backend}_attention"
    return attention_with_temperature


def _register_learnable_backend(backend: str) -> str:
    """Register `attn_temp_<backend>` with the attention and mask interfaces, and return that name."""
    name = f"{IMPLEMENTATION_PREFIX}{backend}"
    if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return name
    mask_backend = backend if backend in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else None
    if mask_backend is None and backend.startswith("flash_attention"):
        mask_backend = "flash_attention_2"
    if mask_backend is None:
        raise UnsupportedModelError(
            f"Learnable attention temperature does not support the `{backend}` attention backend, because "
            "transformers has no mask function for it. Use eager, sdpa or flex_attention."
        )
    AttentionInterface.register(name, _make_learnable_attention(backend))
    # Without a mask function of the same name, transformers passes no mask and padding would be attended.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_backend])
    return name


def _backend_of(implementation: str) -> str:
    return implementation.removeprefix(IMPLEMENTATION_PREFIX)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, backend: str):
    """Switch the model's attention backend inside the block and restore it afterwards, keeping temperatures.

    Use it to read attention weights: `with attention_implementation(model, "eager"): model(...,
    output_attentions=True)`. Learnable temperatures stay in force through the matching `attn_temp_` backend.
    """
    base = unwrap_model(model)
    current = base.config._attn_implementation
    target = _register_learnable_backend(backend) if current.startswith(IMPLEMENTATION_PREFIX) else backend
    if target != current:
        base.set_attn_implementation(target)
    try:
        yield base
    finally:
        if target != current:
            base.set_attn_implementation(current)


# ---------------------------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------------------------


def _num_heads(base: PreTrainedModel, module: nn.Module) -> int:
    for attribute in ("num_heads", "num_attention_heads"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    return base.config.get_text_config().num_attention_heads


def _new_log_temperature(temperature: float, shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    # The temperature is kept in float32 even in a bf16 model: exp(log T) in bf16 is off by up to 0.4%.
    value = torch.full(shape, math.log(temperature), dtype=torch.float32, device=like.device)
    return nn.Parameter(value)


def _any_parameter(module: nn.Module, fallback: nn.Module) -> torch.Tensor:
    parameter = next(module.parameters(), None)
    return parameter if parameter is not None else next(fallback.parameters())


def is_patched(model: nn.Module) -> bool:
    """Check whether attn_temp has patched this model."""
    base = unwrap_model(model)
    for module in base.modules():
        if hasattr(module, BASE_SCALING) or hasattr(module, LOG_TEMPERATURE):
            return True
        if _scale_head_output in module._forward_hooks.values():
            return True
    return False


def _enable_temperature_gradients(base: PreTrainedModel) -> int:
    count = 0
    for module in base.modules():
        parameter = getattr(module, LOG_TEMPERATURE, None)
        if isinstance(parameter, nn.Parameter):
            parameter.requires_grad_(True)
            count += 1
    return count


def patch_model(
    model: nn.Module,
    *,
    head_temperature: float | None = None,
    attention_temperature=None,
    learnable: bool = False,
    per_head: bool = False,
) -> nn.Module:
    """Put softmax_T into the model's output head and/or attention layers, in place, and return the model.

    Args:
        model (`PreTrainedModel` or peft model): the model to patch.
        head_temperature (`float`, *optional*): T > 0 for the output head; the logits the model returns and
            the loss it computes become those of logits / T.
        attention_temperature (`float`, sequence or mapping, *optional*): T > 0 for every attention layer, a
            sequence with one value per layer (None leaves a layer alone), or `{layer_index: T}`.
        learnable (`bool`): make the given temperatures trainable, log-parameterised parameters named
            `attn_temp_log_temperature`; an optimizer built after patching trains them.
        per_head (`bool`): with `learnable`, one attention temperature per head.

    Calling it again replaces the temperatures. Called with no temperature arguments, it re-applies the
    values in `config.attn_temp`. On an already patched model it keeps the current (learned) values and
    turns their gradients back on, because `get_peft_model` freezes them.

    Raises:
        ValueError: a temperature <= 0, NaN, infinite or not a number; a per-layer sequence of the wrong
            length; a layer index out of range; no head found for `head_temperature`.
        UnsupportedModelError: attention temperature on a model whose attention bypasses the interface.
    """
    base = unwrap_model(model)

    # ----- PREPARATION -----
    layers = find_attention_modules(base)
    num_layers = len(layers)
    no_arguments = head_temperature is None and attention_temperature is None
    if no_arguments:
        if is_patched(base):
            count = _enable_temperature_gradients(base)
            logger.info("Model already patched; kept its temperatures and enabled gradients of %d learnable ones.", count)
            return model
        stored = getattr(base.config, CONFIG_KEY, None)
        if stored is None:
            raise ValueError(
                "Nothing to patch: pass `head_temperature` and/or `attention_temperature`, "
                f"or load a checkpoint whose config.json has an `{CONFIG_KEY}` entry."
            )
        settings = TemperatureConfig.from_dict(stored, num_layers)
    else:
        settings = TemperatureConfig(
            head_temperature=head_temperature,
            attention_temperature=normalize_attention_temperature(attention_temperature, num_layers),
            learnable=learnable,
            per_head=per_head,
        )

    # ----- ERROR CHECKS (before anything is changed) -----
    wants_attention = any(t is not None for t in settings.attention_temperature)
    if (attention_temperature is not None and num_layers == 0) or (wants_attention and not supports_attention_temperature(base)):
        raise UnsupportedModelError(
            f"Attention temperature is not supported for model type `{base.config.model_type}` "
            f"({type(base).__name__}): its attention does not go through transformers' attention interface "
            "(ALL_ATTENTION_FUNCTIONS with `scaling`). Supported: BERT-family, ViT, GPT-2, Llama-style decoders and "
            "other models whose attention modules call that interface. Head temperature alone still works."
        )
    head_name, head = find_head(base) if settings.head_temperature is not None else (None, None)
    backend = _backend_of(base.config._attn_implementation or "sdpa")
    if settings.learnable and wants_attention:
        learnable_implementation = _register_learnable_backend(backend)

    # ----- REPLACE any earlier patch, so temperatures never stack -----
    unpatch_model(base)

    # ----- ATTENTION -----
    for index, modules in layers.items():
        temperature = settings.attention_temperature[index] if index < num_layers else None
        if temperature is None:
            continue
        for module in modules:
            if settings.learnable:
                shape = (_num_heads(base, module),) if settings.per_head else ()
                module.register_parameter(LOG_TEMPERATURE, _new_log_temperature(temperature, shape, _any_parameter(module, base)))
            else:
                setattr(module, BASE_SCALING, module.scaling)
                setattr(module, FIXED_TEMPERATURE, temperature)
                module.scaling = module.scaling / temperature
    if settings.learnable and wants_attention:
        base.set_attn_implementation(learnable_implementation)

    # ----- HEAD -----
    if head is not None:
        if settings.learnable:
            head.register_parameter(LOG_TEMPERATURE, _new_log_temperature(settings.head_temperature, (), _any_parameter(head, base)))
        else:
            setattr(head, FIXED_TEMPERATURE, settings.head_temperature)
        head.register_forward_hook(_scale_head_output)

    # ----- HOUSEKEEPING -----
    setattr(base.config, CONFIG_KEY, settings.to_dict())
    logger.info(
        "Patched %s: head %s at T=%s, %d of %d attention layers%s.",
        type(base).__name__,
        head_name,
        settings.head_temperature,
        sum(t is not None for t in settings.attention_temperature),
        num_layers,
        " (learnable)" if settings.learnable else "",
    )
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove every attn_temp change, restoring the model's original computation bit for bit."""
    base = unwrap_model(model)
    for module in base.modules():
        if hasattr(module, BASE_SCALING):
            module.scaling = getattr(module, BASE_SCALING)
            delattr(module, BASE_SCALING)
        if hasattr(module, FIXED_TEMPERATURE):
            delattr(module, FIXED_TEMPERATURE)
        if LOG_TEMPERATURE in module._parameters:
            del module._parameters[LOG_TEMPERATURE]
        # Hooks are matched by function, not handle: peft's deep copies of a head carry the hook too.
        for hook_id, hook in list(module._forward_hooks.items()):
            if hook is _scale_head_output:
                del module._forward_hooks[hook_id]
    implementation = base.config._attn_implementation
    if implementation and implementation.startswith(IMPLEMENTATION_PREFIX):
        base.set_attn_implementation(_backend_of(implementation))
    if hasattr(base.config, CONFIG_KEY):
        delattr(base.config, CONFIG_KEY)
    return model


def get_temperatures(model: nn.Module) -> dict:
    """Return the temperatures now in force, learned values included.

    Keys: `head_temperature` (float or None), `attention_temperature` (one entry per layer: a float, a list
    of per-head floats, or None), `learnable` and `per_head`.
    """
    base = unwrap_model(model)
    stored = getattr(base.config, CONFIG_KEY, None) or {}
    head = head_temperature(base)
    attention: list = []
    for modules in find_attention_modules(base).values():
        temperature = _module_temperature(modules[0])
        if isinstance(temperature, torch.Tensor):
            values = temperature.detach().float().cpu()
            temperature = values.tolist() if values.ndim else values.item()
        attention.append(temperature)
    if isinstance(head, torch.Tensor):
        head = head.detach().float().item()
    return {
        "head_temperature": head,
        "attention_temperature": attention,
        "learnable": bool(stored.get("learnable", False)),
        "per_head": bool(stored.get("per_head", False)),
    }


def load_patched(path: str | os.PathLike, model_class=None, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a checkpoint saved from a patched model and re-apply its temperatures, learned values included.

    Args:
        path (`str`): a local folder or Hub id written by `save_pretrained`.
        model_class (*optional*): the transformers class to load with; defaults to
            `AutoModelForSequenceClassification`. Use e.g. `AutoModelForCausalLM` for language models.
        from_pretrained_kwargs: passed to `model_class.from_pretrained`.
    """
    from transformers import AutoModelForSequenceClassification

    model_class = model_class or AutoModelForSequenceClassification
    with _learned_temperatures_expected(model_class, path, from_pretrained_kwargs):
        model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    if getattr(model.config, CONFIG_KEY, None) is None:
        logger.warning("%s has no `%s` entry in its config; returning it unpatched.", path, CONFIG_KEY)
        return model
    patch_model(model)
    if model.config.attn_temp.get("learnable"):
        _load_learned_temperatures(model, path, from_pretrained_kwargs)
    return model


@contextlib.contextmanager
def _learned_temperatures_expected(model_class, path, from_pretrained_kwargs):
    """Mark `*.attn_temp_log_temperature` weights as expected while `model_class` loads `path`.

    The unpatched model has no such parameters, so transformers would list them as UNEXPECTED in its load
    report, although `load_patched` loads them right after. transformers reads the patterns of
    `_keys_to_ignore_on_load_unexpected` from the class when it builds the model, so the class attribute is
    extended for the duration of the load and restored afterwards.
    """
    concrete_class = model_class
    model_mapping = getattr(model_class, "_model_mapping", None)
    if model_mapping is not None:
        # An Auto class: the class it builds depends on the checkpoint's config.
        from transformers import AutoConfig, PretrainedConfig
        from transformers.models.auto.auto_factory import _get_model_class

        config_kwargs = {
            key: from_pretrained_kwargs[key]
            for key in ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
            if key in from_pretrained_kwargs
        }
        config = from_pretrained_kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config = AutoConfig.from_pretrained(config or path, **config_kwargs)
        try:
            concrete_class = _get_model_class(config, model_mapping)
        except (KeyError, ValueError):
            # from_pretrained itself raises a clear error for an unsupported config.
            concrete_class = None
    if concrete_class is None:
        yield
        return
    attribute = "_keys_to_ignore_on_load_unexpected"
    had_own = attribute in vars(concrete_class)
    previous = vars(concrete_class).get(attribute)
    inherited = getattr(concrete_class, attribute, None) or []
    setattr(concrete_class, attribute, [*inherited, rf"\.{LOG_TEMPERATURE}$"])
    try:
        yield
    finally:
        if had_own:
            setattr(concrete_class, attribute, previous)
        else:
            delattr(concrete_class, attribute)


def _load_learned_temperatures(model: PreTrainedModel, path, from_pretrained_kwargs) -> None:
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    folder = os.fspath(path)
    names = ["model.safetensors"]
    index_file = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isdir(folder) and os.path.exists(index_file):
        import json

        with open(index_file) as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
    learned = {}
    for name in names:
        file = os.path.join(folder, name) if os.path.isdir(folder) else hf_hub_download(
            folder, name, revision=from_pretrained_kwargs.get("revision")
        )
        with safe_open(file, framework="pt") as handle:
            learned.update({key: handle.get_tensor(key) for key in handle.keys() if key.endswith(LOG_TEMPERATURE)})
    if not learned:
        raise ValueError(
            f"{path} has learnable temperatures in its config, but its weights contain no `*.{LOG_TEMPERATURE}` tensors. "
            "The checkpoint is incomplete; save it again from the patched model with `save_pretrained`."
        )
    missing = []
    state = model.state_dict()
    for key, value in learned.items():
        if key not in state:
            missing.append(key)
            continue
        state[key].copy_(value.to(state[key].dtype))
    if missing:
        raise ValueError(f"{path} contains learned temperatures {missing} that match no module of {type(model).__name__}. Load it with the model class it was saved from (`model_class=`).")

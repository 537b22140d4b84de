"""Tests of patch_model / unpatch_model on real transformers models built from small configs and on MiniLM."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

from attn_temp import UnsupportedModelError, get_temperatures, load_patched, patch_model, unpatch_model
from attn_temp.patching import attention_implementation, find_attention_modules, find_head, head_temperature

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def bert(**overrides):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, num_labels=5, **{**SMALL, **overrides})
    return BertForSequenceClassification(config).eval()


def gpt2_lm():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama_lm():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, num_labels=10, **SMALL)
    return ViTForImageClassification(config).eval()


def text_batch(seed=0, batch=3, length=9, vocab=120):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 5:] = 0  # a padded row
    attention_mask[2, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def image_batch(seed=0):
    return {"pixel_values": torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(seed))}


MODELS = {
    "bert": (bert, text_batch),
    "gpt2": (gpt2_lm, text_batch),
    "llama": (llama_lm, text_batch),
    "vit": (vit, image_batch),
}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def padded_rows_only(values, batch):
    """Keep positions that are real tokens, so padded query rows (whose value no one uses) are left out."""
    if "attention_mask" not in batch or values.ndim < 3:
        return values
    return values[batch["attention_mask"].bool()]


# ------------------------------------------------------------------------------------------------
# Attention against an independent computation
# ------------------------------------------------------------------------------------------------


def reference_self_attention(module, hidden_states, attention_mask, temperature):
    """softmax(Q K^T / (T sqrt(d))) V for a BertSelfAttention, written out from its projections."""
    batch, length, _ = hidden_states.shape
    heads, head_dim = module.num_attention_heads, module.attention_head_size

    def split(x):  # (B, L, H*D) -> (B, H, L, D)
        return x.view(batch, length, heads, head_dim).transpose(1, 2)

    query, key, value = split(module.query(hidden_states)), split(module.key(hidden_states)), split(module.value(hidden_states))
    scores = query @ key.transpose(-1, -2) / (temperature * math.sqrt(head_dim))
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    output = scores.softmax(-1) @ value  # (B, H, L, D)
    return output.transpose(1, 2).reshape(batch, length, heads * head_dim)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("learnable", [False, True])
def test_attention_matches_reference(backend, learnable):
    model = bert()
    model.set_attn_implementation(backend)
    patch_model(model, attention_temperature=[0.5, 2.0, 7.0], learnable=learnable)
    batch = text_batch()
    captured = {}
    layer = model.bert.encoder.layer[1].attention.self
    layer.register_forward_pre_hook(lambda m, args, kwargs: captured.update(inputs=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    layer.register_forward_hook(lambda m, args, output: captured.update(output=output[0]))
    with torch.no_grad():
        model(**batch)
        expected = reference_self_attention(layer, captured["inputs"], batch["attention_mask"], temperature=2.0)
    torch.testing.assert_close(
        padded_rows_only(captured["output"], batch), padded_rows_only(expected, batch), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------------------------
# Backends, identity at T = 1, unpatching, replacing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
@pytest.mark.parametrize("learnable", [False, True])
def test_eager_and_sdpa_agree_with_padding(family, learnable):
    build, make_batch = MODELS[family]
    batch = make_batch()
    outputs = {}
    for backend in ("eager", "sdpa"):
        model = build()
        model.set_attn_implementation(backend)
        patch_model(model, attention_temperature=[0.3, 4.0, 2.5], head_temperature=3.0, learnable=learnable)
        outputs[backend] = padded_rows_only(logits(model, batch), batch)
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_temperature_changes_outputs(family):
    build, make_batch = MODELS[family]
    model, batch = build(), make_batch()
    before = logits(model, batch)
    patch_model(model, attention_temperature=4.0)
    assert not torch.allclose(before, logits(model, batch))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_temperature_one_is_identity(family, backend):
    build, make_batch = MODELS[family]
    model, batch = build(), make_batch()
    model.set_attn_implementation(backend)
    before = logits(model, batch)
    patch_model(model, head_temperature=1.0, attention_temperature=1.0)
    assert torch.equal(logits(model, batch), before)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
@pytest.mark.parametrize("learnable", [False, True])
def test_unpatch_restores_bit_for_bit(family, learnable):
    build, make_batch = MODELS[family]
    model, batch = build(), make_batch()
    before = logits(model, batch)
    implementation = model.config._attn_implementation
    parameter_names = [name for name, _ in model.named_parameters()]
    patch_model(model, head_temperature=2.0, attention_temperature=0.5, learnable=learnable, per_head=learnable)
    unpatch_model(model)
    assert torch.equal(logits(model, batch), before)
    assert model.config._attn_implementation == implementation
    assert [name for name, _ in model.named_parameters()] == parameter_names
    assert not hasattr(model.config, "attn_temp")


def test_patch_again_replaces_not_stacks():
    batch = text_batch()
    once = bert()
    patch_model(once, head_temperature=3.0, attention_temperature=2.0)
    twice = bert()
    patch_model(twice, head_temperature=5.0, attention_temperature=[9.0, 9.0, 9.0])
    patch_model(twice, head_temperature=3.0, attention_temperature=2.0)
    patch_model(twice, head_temperature=3.0, attention_temperature=2.0)
    assert torch.equal(logits(once, batch), logits(twice, batch))
    hooks = sum(len(module._forward_hooks) for module in twice.modules())
    assert hooks == 1


def test_partial_mapping_patches_only_named_layers():
    model = bert()
    patch_model(model, attention_temperature={2: 4.0})
    modules = find_attention_modules(model)
    assert modules[2][0].scaling == pytest.approx(8**-0.5 / 4.0)
    assert modules[0][0].scaling == 8**-0.5
    assert get_temperatures(model)["attention_temperature"] == [None, None, 4.0]


def test_attention_implementation_context_restores_backend():
    model = bert()
    model.set_attn_implementation("sdpa")
    patch_model(model, attention_temperature=2.0, learnable=True)
    assert model.config._attn_implementation == "attn_temp_sdpa"
    batch = text_batch()
    expected = logits(model, batch)
    with attention_implementation(model, "eager"):
        assert model.config._attn_implementation == "attn_temp_eager"
        with torch.no_grad():
            output = model(**batch, output_attentions=True)
    assert model.config._attn_implementation == "attn_temp_sdpa"
    assert len(output.attentions) == 3
    torch.testing.assert_close(output.logits, expected, rtol=1e-4, atol=1e-5)


def test_flex_attention_applies_temperature():
    batch = {"input_ids": text_batch()["input_ids"]}
    results = {}
    for backend in ("eager", "flex_attention"):
        model = bert()
        try:
            model.set_attn_implementation(backend)
            patch_model(model, attention_temperature=3.0)
            results[backend] = logits(model, batch)
        except Exception as error:  # flex_attention compiles a kernel, which some CPU set-ups cannot do
            pytest.skip(f"flex_attention does not run here: {type(error).__name__}: {error}")
    torch.testing.assert_close(results["eager"], results["flex_attention"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Head temperature
# ------------------------------------------------------------------------------------------------


def test_head_temperature_divides_logits_and_loss():
    model, batch = bert(), text_batch()
    labels = torch.tensor([0, 3, 4])
    raw = logits(model, batch)
    patch_model(model, head_temperature=4.0)
    with torch.no_grad():
        output = model(**batch, labels=labels)
    torch.testing.assert_close(output.logits, raw / 4.0)
    torch.testing.assert_close(output.loss, F.cross_entropy(raw / 4.0, labels))
    assert head_temperature(model) == 4.0


def test_head_temperature_on_causal_lm():
    model, batch = gpt2_lm(), text_batch()
    raw = logits(model, batch)
    patch_model(model, head_temperature=0.25)
    assert find_head(model)[0] == "lm_head"
    with torch.no_grad():
        output = model(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(output.logits, raw * 4.0)
    expected_loss = F.cross_entropy((raw * 4.0)[:, :-1].reshape(-1, 120), batch["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(output.loss, expected_loss)


def test_gpt2_sequence_classifier_head():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, num_labels=3, pad_token_id=0)
    model = GPT2ForSequenceClassification(config).eval()
    batch = text_batch()
    raw = logits(model, batch)
    patch_model(model, head_temperature=2.0)
    assert find_head(model)[0] == "score"
    torch.testing.assert_close(logits(model, batch), raw / 2.0)


@pytest.mark.parametrize(
    "build, head_name",
    [
        (lambda: RobertaForSequenceClassification(RobertaConfig(vocab_size=120, num_labels=4, **SMALL)), "classifier.out_proj"),
        (lambda: ElectraForSequenceClassification(ElectraConfig(vocab_size=120, num_labels=4, embedding_size=32, **SMALL)), "classifier.out_proj"),
        (
            lambda: DistilBertForSequenceClassification(
                DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64, num_labels=4)
            ),
            "classifier",
        ),
    ],
    ids=["roberta", "electra", "distilbert"],
)
def test_bert_family_found_generically(build, head_name):
    model = build().eval()
    batch = text_batch()
    raw = logits(model, batch)
    assert find_head(model)[0] == head_name
    assert sorted(find_attention_modules(model)) == [0, 1, 2]
    patch_model(model, head_temperature=2.0, attention_temperature=1.0)
    torch.testing.assert_close(logits(model, batch), raw / 2.0)
    patch_model(model, attention_temperature=5.0)
    assert not torch.allclose(logits(model, batch), raw)


# ------------------------------------------------------------------------------------------------
# Learnable temperatures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_learnable_temperatures_get_gradients(per_head):
    model = bert()
    patch_model(model, head_temperature=2.0, attention_temperature=1.5, learnable=True, per_head=per_head)
    names = {name: parameter for name, parameter in model.named_parameters() if "attn_temp" in name}
    assert len(names) == 4  # three attention layers and the head
    expected_shape = (4,) if per_head else ()
    assert names["bert.encoder.layer.0.attention.self.attn_temp_log_temperature"].shape == expected_shape
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    output = model(**text_batch(), labels=torch.tensor([0, 1, 2]))
    output.loss.backward()
    for name, parameter in names.items():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    before = get_temperatures(model)
    optimizer.step()
    after = get_temperatures(model)
    assert after["head_temperature"] != before["head_temperature"]
    assert after["head_temperature"] > 0


# ------------------------------------------------------------------------------------------------
# Numerics at extreme temperatures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1e3])
@pytest.mark.parametrize("learnable", [False, True])
def test_extreme_temperatures_stay_finite(dtype, temperature, learnable):
    model = bert().to(dtype).train()
    patch_model(model, head_temperature=temperature, attention_temperature=temperature, learnable=learnable)
    output = model(**text_batch(), labels=torch.tensor([0, 1, 2]))
    output.loss.backward()
    assert torch.isfinite(output.logits).all()
    assert torch.isfinite(output.loss)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


# ------------------------------------------------------------------------------------------------
# Save and reload
# ------------------------------------------------------------------------------------------------


def test_fixed_temperatures_round_trip(tmp_path):
    model, batch = bert(), text_batch()
    patch_model(model, head_temperature=2.0, attention_temperature=[1.0, 3.0, None])
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)

    reloaded = load_patched(tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), expected)
    assert get_temperatures(reloaded)["attention_temperature"] == [1.0, 3.0, None]

    plain = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain, batch), logits(unpatch_model(model), batch))
    patch_model(plain)  # no arguments: re-applies config.attn_temp
    torch.testing.assert_close(logits(plain, batch), expected)


def test_learned_temperatures_round_trip(tmp_path):
    model, batch = bert(), text_batch()
    patch_model(model, head_temperature=2.0, attention_temperature=1.0, learnable=True, per_head=True)
    with torch.no_grad():
        model.classifier.attn_temp_log_temperature.fill_(math.log(3.5))
        model.bert.encoder.layer[1].attention.self.attn_temp_log_temperature.copy_(torch.log(torch.tensor([0.5, 1.0, 2.0, 4.0])))
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)

    reloaded = load_patched(tmp_path, model_class=AutoModelForSequenceClassification)
    temperatures = get_temperatures(reloaded)
    assert temperatures["head_temperature"] == pytest.approx(3.5)
    assert temperatures["attention_temperature"][1] == pytest.approx([0.5, 1.0, 2.0, 4.0])
    torch.testing.assert_close(logits(reloaded, batch), expected)


class _RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_report_messages(load):
    """Run `load()` and return what transformers logged meanwhile (its logger does not propagate to root)."""
    handler = _RecordingHandler()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        model = load()
    finally:
        transformers_logger.removeHandler(handler)
    return model, "\n".join(handler.messages)


def test_load_patched_reports_no_unexpected_keys(tmp_path):
    model = bert()
    patch_model(model, head_temperature=2.0, attention_temperature=1.0, learnable=True)
    model.save_pretrained(tmp_path)
    class_attribute_before = vars(BertForSequenceClassification).get("_keys_to_ignore_on_load_unexpected")

    reloaded, messages = load_report_messages(lambda: load_patched(tmp_path))
    assert "attn_temp_log_temperature" not in messages
    assert get_temperatures(reloaded)["head_temperature"] == pytest.approx(2.0)

    # The class is left as it was, so a plain load still reports the weights it does not load.
    assert vars(BertForSequenceClassification).get("_keys_to_ignore_on_load_unexpected") == class_attribute_before
    _, messages = load_report_messages(lambda: BertForSequenceClassification.from_pretrained(tmp_path))
    assert "attn_temp_log_temperature" in messages
    assert "UNEXPECTED" in messages


def test_broken_config_entry_raises(tmp_path):
    model = bert()
    patch_model(model, head_temperature=2.0)
    model.config.attn_temp["head_temperature"] = -1.0
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head_temperature.*-1.0"):
        load_patched(tmp_path)


# ------------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------------


def lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], lora_dropout=0.0)
    return get_peft_model(model, config)


def train_one_step(model):
    batch = text_batch()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_peft_trains_adapters_and_temperatures(order):
    model = bert()
    batch = text_batch()
    raw = logits(model, batch)
    if order == "patch_then_peft":
        patch_model(model, head_temperature=2.0, attention_temperature=1.5, learnable=True)
        model = lora(model)
        patch_model(model)  # peft froze the temperatures; this turns their gradients back on
    else:
        model = lora(model)
        patch_model(model, head_temperature=2.0, attention_temperature=1.5, learnable=True)
    model.eval()
    assert logits(model, batch).shape == raw.shape
    frozen = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if not parameter.requires_grad}
    temperatures_before = get_temperatures(model)
    train_one_step(model)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any("lora_A" in name for name in names)
    assert any("attn_temp_log_temperature" in name for name in names)
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    after = get_temperatures(model)
    assert after["head_temperature"] != temperatures_before["head_temperature"]
    assert after["attention_temperature"] != temperatures_before["attention_temperature"]


def test_peft_fixed_head_temperature_scales_logits():
    model, batch = bert(), text_batch()
    peft_model = lora(model)
    peft_model.eval()
    raw = logits(peft_model, batch)
    patch_model(peft_model, head_temperature=5.0)
    assert find_head(peft_model)[0] == "classifier"
    torch.testing.assert_close(logits(peft_model, batch), raw / 5.0)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "2", True, [2.0]])
def test_invalid_head_temperature_raises(value):
    with pytest.raises(ValueError, match="head_temperature"):
        patch_model(bert(), head_temperature=value)


@pytest.mark.parametrize(
    "value, message",
    [
        (0.0, "attention_temperature"),
        (float("nan"), "nan"),
        ([1.0, 2.0], "has 2 values, but the model has 3"),
        ([1.0, -2.0, 1.0], r"attention_temperature\[1\]"),
        ({3: 2.0}, "layer 3"),
        ({-1: 2.0}, "layer -1"),
        ({"a": 2.0}, "'a'"),
    ],
)
def test_invalid_attention_temperature_raises(value, message):
    model = bert()
    before = logits(model, text_batch())
    with pytest.raises(ValueError, match=message):
        patch_model(model, attention_temperature=value)
    assert torch.equal(logits(model, text_batch()), before)  # nothing was changed


def test_per_head_without_learnable_raises():
    with pytest.raises(ValueError, match="per_head"):
        patch_model(bert(), attention_temperature=2.0, per_head=True)


def test_no_temperature_and_no_config_raises():
    with pytest.raises(ValueError, match="Nothing to patch"):
        patch_model(bert())


def test_non_transformers_model_raises():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(3, 3), head_temperature=2.0)


def test_deberta_attention_unsupported_but_head_works():
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=120, num_labels=3, **SMALL)
    model = DebertaV2ForSequenceClassification(config).eval()
    with pytest.raises(UnsupportedModelError, match="deberta-v2") as error:
        patch_model(model, attention_temperature=2.0)
    assert "Head temperature alone still works" in str(error.value)
    batch = text_batch()
    raw = logits(model, batch)
    patch_model(model, head_temperature=2.0)
    torch.testing.assert_close(logits(model, batch), raw / 2.0)


# ------------------------------------------------------------------------------------------------
# The real pretrained all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------------


def test_minilm_backends_agree_and_identity(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = ["a domesticated carnivorous mammal", "the act of running", "a large body of salt water that surrounds land"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    outputs = {}
    for backend in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=26).eval()
        model.set_attn_implementation(backend)
        raw = logits(model, batch)
        patch_model(model, attention_temperature=1.0, head_temperature=1.0)
        assert torch.equal(logits(model, batch), raw)
        patch_model(model, attention_temperature=[0.5, 1, 2, 4, 8, 16], head_temperature=8.0)
        outputs[backend] = logits(model, batch)
        assert not torch.allclose(outputs[backend], raw / 8.0)
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-5)

"""measure_representations and extract_features on the real MiniLM with WordNet glosses, and on small ViT and
GPT-2 configs; plots and the evaluate module."""

import json
import math
import struct

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

from attn_temp import patch_model
from attn_temp.data import load_wordnet_glosses
from attn_temp.measure import (
    EVALUATE_MODULE_PATH,
    SampleBoundWarning,
    extract_features,
    layer_names,
    measure_representations,
    pool_tokens,
    resolve_pooling,
)
from attn_temp.metrics import feature_singular_values, numerical_rank
from attn_temp.plotting import plot_rank_per_layer, plot_singular_values

NUM_GLOSSES = 400  # more than the 384 features; with batches of 32, the last batch has 16 glosses
NUM_SUPERSENSES = 26


# The small LAPACK calls here run faster on one thread (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the real MiniLM on real WordNet glosses
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def glosses(tokenizer):
    split = load_wordnet_glosses("noun")["validation"].shuffle(seed=0).select(range(NUM_GLOSSES))
    encoded = split.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"]
    )
    return encoded.rename_column("label", "labels")


def gloss_loader(glosses, tokenizer, batch_size=32):
    return DataLoader(glosses, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))


def new_classifier(minilm_path, **patch):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=NUM_SUPERSENSES)
    return patch_model(model, **patch) if patch else model


@pytest.fixture(scope="module")
def classifier(minilm_path):
    return new_classifier(minilm_path, head_temperature=4.0, attention_temperature=2.0)


@pytest.fixture(scope="module")
def report(classifier, glosses, tokenizer):
    return measure_representations(classifier, gloss_loader(glosses, tokenizer))


@pytest.fixture(scope="module")
def features(classifier, glosses, tokenizer):
    return extract_features(classifier, gloss_loader(glosses, tokenizer))


@pytest.fixture(scope="module")
def sdpa_report(classifier, glosses, tokenizer):
    # extract_features runs on the model's SDPA backend; without attention entropy, so does this one.
    return measure_representations(classifier, gloss_loader(glosses, tokenizer), attention_entropy=False)


# ---------------------------------------------------------------------------------------------------------
# Report contents
# ---------------------------------------------------------------------------------------------------------


class TestReportOnMiniLM:
    def test_layer_names_in_model_order(self, report):
        assert list(report.layers) == layer_names(6)
        assert list(report.layers)[:2] == ["embeddings", "layer_0"]
        assert list(report.layers)[-4:] == ["pooled", "logits", "effective_logits", "probabilities"]

    def test_to_dict_is_json_with_required_fields(self, report):
        data = json.loads(json.dumps(report.to_dict()))
        for name, layer in data["layers"].items():
            for key in ("numerical_rank", "effective_rank", "stable_rank", "top_singular_values", "num_samples", "feature_dim"):
                assert key in layer, (name, key)
            assert layer["num_samples"] == NUM_GLOSSES
            assert len(layer["top_singular_values"]) == 10
        assert data["layers"]["layer_3"]["feature_dim"] == 384
        assert data["layers"]["logits"]["feature_dim"] == NUM_SUPERSENSES
        assert data["settings"]["pooling"] == "cls"
        assert data["settings"]["center"] is True

    def test_ranks_equal_materialised_svd(self, sdpa_report, features):
        for name, layer in sdpa_report.layers.items():
            rows = features.features[name]
            reference = feature_singular_values(rows)
            assert (layer.singular_values - reference).abs().max() <= 1e-6 * reference[0], name
            centred = rows.double() - rows.double().mean(0)
            if reference[0] > 0:
                assert layer.numerical_rank == torch.linalg.matrix_rank(centred, rtol=1e-3).item(), name

    def test_cls_embedding_has_rank_zero(self, report):
        # The CLS token's embedding is the same for every gloss, so its centred features vanish.
        assert report.layers["embeddings"].numerical_rank == 0
        assert report.layers["embeddings"].effective_rank == 0.0
        assert report.layers["layer_0"].numerical_rank > 300

    def test_logits_norm_raw_is_temperature_times_effective(self, report, features):
        assert report.logits_norm["raw"] == pytest.approx(4.0 * report.logits_norm["effective"], rel=1e-5)
        expected = features.effective_logits.norm(dim=1).mean().item()
        assert report.logits_norm["effective"] == pytest.approx(expected, rel=1e-4)
        torch.testing.assert_close(features.logits, 4.0 * features.effective_logits)

    def test_probabilities_are_softmax_of_effective_logits(self, features):
        expected = features.effective_logits.softmax(dim=1)
        torch.testing.assert_close(features.features["probabilities"], expected)

    def test_temperatures_recorded(self, report):
        assert report.temperatures["head_temperature"] == 4.0
        assert report.temperatures["attention_temperature"] == [2.0] * 6

    def test_neural_collapse_present_and_matches_features(self, report, features):
        collapse = report.neural_collapse
        assert set(collapse) >= {"nc1", "nc2", "nc3", "nc4", "num_classes"}
        assert collapse["num_classes"] == len(features.labels.unique())
        pooled = features.features["pooled"].double()
        classes = features.labels.unique()
        means = torch.stack([pooled[features.labels == c].mean(0) for c in classes])
        nearest = classes[torch.cdist(pooled, means).argmin(1)]
        predicted = features.effective_logits.argmax(1)
        assert collapse["nc4"] == pytest.approx((nearest != predicted).double().mean().item())
        # An untrained head is far from collapse.
        assert collapse["nc1"] > 0.1

    def test_extracted_labels_match_dataset(self, features, glosses):
        assert features.labels.tolist() == glosses["labels"]
        assert features.features["layer_5"].shape == (NUM_GLOSSES, 384)


class TestAttentionEntropy:
    def test_matches_manual_eager_computation(self, classifier, glosses, tokenizer, report):
        sums = torch.zeros(6, dtype=torch.float64)
        count = 0
        classifier.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                for batch in gloss_loader(glosses, tokenizer):
                    batch.pop("labels")
                    attentions = classifier(**batch, output_attentions=True).attentions
                    mask = batch["attention_mask"].bool()
                    for index, probabilities in enumerate(attentions):
                        p = probabilities.double()
                        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean(1)  # (B, S)
                        sums[index] += entropy[mask].sum()
                    count += int(mask.sum())
        finally:
            classifier.set_attn_implementation("sdpa")
        for index in range(6):
            assert report.attention_entropy[f"layer_{index}"] == pytest.approx(sums[index].item() / count, rel=1e-5)

    def test_backend_restored(self, classifier, report):
        assert classifier.config._attn_implementation == "sdpa"

    def test_higher_attention_temperature_raises_entropy(self, minilm_path, glosses, tokenizer):
        loader = gloss_loader(glosses.select(range(24)), tokenizer)
        entropies = {}
        for temperature in (0.5, 8.0):
            model = new_classifier(minilm_path, attention_temperature=temperature)
            with pytest.warns(SampleBoundWarning):
                entropies[temperature] = measure_representations(model, loader).attention_entropy
        for layer in entropies[0.5]:
            assert entropies[8.0][layer] > entropies[0.5][layer]
        # Entropy over at most 32 keys cannot exceed log 32.
        assert max(entropies[8.0].values()) <= math.log(32)

    def test_learnable_backend_restored(self, minilm_path, glosses, tokenizer):
        model = new_classifier(minilm_path, head_temperature=2.0, attention_temperature=3.0, learnable=True)
        before = model.config._attn_implementation
        with pytest.warns(SampleBoundWarning):
            result = measure_representations(model, gloss_loader(glosses.select(range(40)), tokenizer))
        assert model.config._attn_implementation == before
        assert result.temperatures["learnable"] is True
        assert result.logits_norm["raw"] == pytest.approx(2.0 * result.logits_norm["effective"], rel=1e-5)


class TestModelStateAndOptions:
    def test_training_mode_and_hooks_restored(self, minilm_path, glosses, tokenizer):
        model = new_classifier(minilm_path)
        model.train()
        hooks_before = len(model.classifier._forward_hooks)
        with pytest.warns(SampleBoundWarning):
            measure_representations(model, gloss_loader(glosses.select(range(20)), tokenizer), attention_entropy=False)
        assert model.training
        assert len(model.classifier._forward_hooks) == hooks_before

    def test_fewer_samples_than_features_warns(self, classifier, glosses, tokenizer):
        loader = gloss_loader(glosses.select(range(10)), tokenizer)
        with pytest.warns(SampleBoundWarning, match=r"layer_0 \(10 < 384\).*at most the sample count minus one"):
            result = measure_representations(classifier, loader, attention_entropy=False)
        assert result.layers["layer_0"].numerical_rank == 9

    def test_max_samples_stops_early(self, classifier, glosses, tokenizer):
        with pytest.warns(SampleBoundWarning):
            result = measure_representations(
                classifier, gloss_loader(glosses, tokenizer), max_samples=45, attention_entropy=False
            )
        assert result.settings["num_samples"] == 45
        assert result.layers["layer_2"].num_samples == 45

    def test_token_level_counts_non_padding_tokens(self, classifier, glosses, tokenizer):
        subset = glosses.select(range(40))
        with pytest.warns(SampleBoundWarning, match=r"pooled \(40 < 384\)"):
            result = measure_representations(
                classifier, gloss_loader(subset, tokenizer), token_level=True, attention_entropy=False
            )
        tokens = sum(len(ids) for ids in subset["input_ids"])
        assert result.layers["layer_0"].num_samples == tokens
        # BERT's head input is one pooled vector per gloss.
        assert result.layers["pooled"].num_samples == 40
        assert result.neural_collapse is not None

    def test_uncentred_differs_from_centred(self, classifier, glosses, tokenizer):
        subset = gloss_loader(glosses.select(range(40)), tokenizer)
        with pytest.warns(SampleBoundWarning):
            uncentred = measure_representations(classifier, subset, center=False, attention_entropy=False)
        # The constant CLS embedding has rank 1 without centring.
        assert uncentred.layers["embeddings"].numerical_rank == 1
        assert uncentred.settings["center"] is False

    def test_save_json_round_trip(self, report, tmp_path):
        path = tmp_path / "out" / "rank.json"
        report.save_json(path, full_spectrum=True)
        loaded = json.loads(path.read_text())
        assert loaded["layers"]["layer_1"]["numerical_rank"] == report.layers["layer_1"].numerical_rank
        assert len(loaded["layers"]["layer_1"]["singular_values"]) == 384
        assert list(tmp_path.joinpath("out").iterdir()) == [path]


class TestPooling:
    def test_pool_tokens_right_and_left_padding(self):
        hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
        right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
        left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
        assert pool_tokens(hidden, right, "cls").flatten().tolist() == [0.0, 4.0]
        assert pool_tokens(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
        assert pool_tokens(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]
        assert pool_tokens(hidden, left, "cls").flatten().tolist() == [2.0, 4.0]
        assert pool_tokens(hidden, left, "last").flatten().tolist() == [3.0, 7.0]

    def test_auto_pooling_per_model_kind(self, classifier):
        assert resolve_pooling(classifier, "auto") == "cls"
        assert resolve_pooling(tiny_gpt2(), "auto") == "last"
        assert resolve_pooling(tiny_vit(), "auto") == "cls"
        assert resolve_pooling(classifier, "mean") == "mean"
        with pytest.raises(ValueError, match="pooling"):
            resolve_pooling(classifier, "max")

    def test_mean_pooling_matches_manual(self, classifier, glosses, tokenizer):
        subset = glosses.select(range(20))
        extracted = extract_features(classifier, gloss_loader(subset, tokenizer, batch_size=8), pooling="mean")
        batch = DataCollatorWithPadding(tokenizer)([{k: subset[i][k] for k in ("input_ids", "token_type_ids", "attention_mask")} for i in range(8)])
        with torch.no_grad():
            hidden = classifier(**batch, output_hidden_states=True).hidden_states[3]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(extracted.features["layer_2"][:8], expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


class TestBadInput:
    def test_empty_dataloader(self, classifier):
        with pytest.raises(ValueError, match="no samples"):
            measure_representations(classifier, DataLoader([], batch_size=4))

    def test_missing_input_key_names_it(self, classifier):
        loader = [{"attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}]
        with pytest.raises(ValueError, match=r"'input_ids'.*BertForSequenceClassification.*attention_mask"):
            measure_representations(classifier, loader)

    def test_non_dict_batch(self, classifier):
        with pytest.raises(ValueError, match="dict of tensors"):
            measure_representations(classifier, [torch.ones(2, 3, dtype=torch.long)])

    def test_nan_features_name_the_layer(self, minilm_path, glosses, tokenizer):
        model = new_classifier(minilm_path)
        with torch.no_grad():
            model.bert.encoder.layer[2].output.dense.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="Layer 'layer_2'.*NaN or inf"):
            measure_representations(model, gloss_loader(glosses.select(range(8)), tokenizer))
        assert model.config._attn_implementation == "sdpa"

    def test_invalid_arguments(self, classifier, glosses, tokenizer):
        loader = gloss_loader(glosses.select(range(8)), tokenizer)
        with pytest.raises(ValueError, match="rank_tolerance"):
            measure_representations(classifier, loader, rank_tolerance=0.0)
        with pytest.raises(ValueError, match="max_samples"):
            measure_representations(classifier, loader, max_samples=0)
        with pytest.raises(ValueError, match="top_k_singular_values"):
            measure_representations(classifier, loader, top_k_singular_values=0)

    def test_unprepared_dataloader_with_two_processes(self, classifier):
        class TwoProcesses:
            num_processes = 2

        with pytest.raises(ValueError, match="accelerator.prepare"):
            measure_representations(classifier, [], accelerator=TwoProcesses())


# ---------------------------------------------------------------------------------------------------------
# Small ViT and GPT-2 configs
# ---------------------------------------------------------------------------------------------------------


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10,
    )
    return ViTForImageClassification(config)


def tiny_gpt2(model_class=GPT2ForSequenceClassification):
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1,
    )
    return model_class(config).eval()


def digit_images():
    """Real handwritten digits (scikit-learn's 8x8 set) upsampled to 16x16, as ViT batches."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:96], dtype=torch.float32).unsqueeze(1) / 16.0
    images = images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    labels = torch.tensor(digits.target[:96])
    return [{"pixel_values": images[i : i + 32], "labels": labels[i : i + 32]} for i in range(0, 96, 32)]


def token_batches(num_batches=3, batch_size=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        lengths = torch.randint(3, 12, (batch_size,), generator=generator)
        ids = torch.randint(2, 64, (batch_size, 12), generator=generator)
        mask = torch.arange(12) < lengths.unsqueeze(1)
        batches.append(
            {
                "input_ids": torch.where(mask, ids, 0),
                "attention_mask": mask.long(),
                "labels": torch.randint(0, 3, (batch_size,), generator=generator),
            }
        )
    return batches


class TestViT:
    def test_report_on_digits(self):
        model = patch_model(tiny_vit(), head_temperature=2.0, attention_temperature=0.5)
        batches = digit_images()
        result = measure_representations(model, batches)
        assert list(result.layers) == layer_names(2)
        assert result.settings["pooling"] == "cls"
        assert result.neural_collapse["num_classes"] == 10
        extracted = extract_features(model, batches)
        for name in ("layer_1", "pooled", "logits"):
            reference = feature_singular_values(extracted.features[name])
            assert result.layers[name].numerical_rank == numerical_rank(reference)
        # Every patch is a token: (16 / 4)^2 patches plus CLS, so entropy is at most log 17.
        assert 0 < result.attention_entropy["layer_0"] <= math.log(17)
        assert model.config._attn_implementation == "sdpa"


class TestGPT2:
    def test_sequence_classifier_pools_last_token(self):
        model = tiny_gpt2()
        batches = token_batches()
        extracted = extract_features(model, batches)
        # The score head reads the final hidden states, pooled here at the last non-padding token.
        torch.testing.assert_close(extracted.features["pooled"], extracted.features["layer_1"])
        with torch.no_grad():
            expected = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])
        torch.testing.assert_close(extracted.effective_logits, expected, rtol=1e-4, atol=1e-5)
        result = measure_representations(model, batches)
        assert result.settings["pooling"] == "last"
        assert result.layers["pooled"].num_samples == 60
        assert result.neural_collapse["nc3"] is not None

    def test_language_model_token_level(self):
        model = patch_model(tiny_gpt2(GPT2LMHeadModel), head_temperature=3.0)
        batches = token_batches()
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        result = measure_representations(model, batches, token_level=True)
        for name in ("layer_0", "pooled", "logits", "probabilities"):
            assert result.layers[name].num_samples == tokens, name
        assert result.layers["logits"].feature_dim == 64
        assert result.logits_norm["raw"] == pytest.approx(3.0 * result.logits_norm["effective"], rel=1e-5)
        # Language-model labels are per token, but these are per sequence: no neural collapse on tokens.
        assert result.neural_collapse is None

    def test_wide_layers_skip_spectrum(self):
        model = tiny_gpt2(GPT2LMHeadModel)
        result = measure_representations(model, token_batches(), max_gram_dim=40, attention_entropy=False)
        assert result.layers["logits"].numerical_rank is None
        assert result.layers["logits"].num_samples == 60
        assert result.layers["layer_0"].numerical_rank is not None


# ---------------------------------------------------------------------------------------------------------
# evaluate module and plots
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_module_matches_report(sdpa_report, features):
    import evaluate

    rank = evaluate.load(EVALUATE_MODULE_PATH)
    result = rank.compute(features=features.features["layer_4"].numpy())
    layer = sdpa_report.layers["layer_4"]
    assert result["numerical_rank"] == layer.numerical_rank
    assert result["effective_rank"] == pytest.approx(layer.effective_rank, rel=1e-6)
    assert result["num_samples"] == NUM_GLOSSES


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


class TestPlots:
    def test_rank_per_layer_overlays_reports(self, report, sdpa_report, tmp_path):
        path = plot_rank_per_layer({"eager": report, "sdpa": sdpa_report}, tmp_path / "rank.png")
        width, height = png_size(path)
        assert width > 800
        assert height > 400

    def test_rank_from_json_dicts(self, report, tmp_path):
        data = json.loads(json.dumps(report.to_dict()))
        path = plot_rank_per_layer([data, data], tmp_path / "rank.png", labels=["a", "b"], metrics=["stable_rank"])
        assert png_size(path)[0] > 300

    def test_singular_values(self, report, tmp_path):
        path = plot_singular_values(report, tmp_path / "spectrum.png", layers=["layer_0", "layer_5", "logits"])
        assert png_size(path)[0] > 300

    def test_bad_arguments(self, report, tmp_path):
        with pytest.raises(ValueError, match="metrics"):
            plot_rank_per_layer(report, tmp_path / "x.png", metrics=["trace"])
        with pytest.raises(ValueError, match="one label per report"):
            plot_rank_per_layer([report], tmp_path / "x.png", labels=["a", "b"])
        with pytest.raises(ValueError, match="No singular values"):
            plot_singular_values(report, tmp_path / "x.png", layers=["layer_99"])
        assert not (tmp_path / "x.png").exists()

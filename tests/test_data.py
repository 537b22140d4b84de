"""Tests of attn_temp.data on the real shipped WordNet files, Debian's Fashion-MNIST and scikit-learn digits."""

import collections
import csv
import gzip
import importlib.util
from pathlib import Path

import datasets
import numpy as np
import pytest

from attn_temp import data

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDNET_DIR = Path("/usr/share/wordnet")
FASHION_MNIST_DIR = Path(data.DEFAULT_FASHION_MNIST_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)


def read_shipped_rows(pos):
    with gzip.open(data.PACKAGE_DATA_DIR / data.WORDNET_FILES[pos], "rt", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def nouns():
    return data.load_wordnet_glosses("noun")


@pytest.fixture(scope="module")
def fashion_mnist():
    return data.load_fashion_mnist()


# --------------------------------------------------------------------------------------------------
# WordNet
# --------------------------------------------------------------------------------------------------


class TestWordnetGlosses:
    def test_noun_counts(self, nouns):
        assert set(nouns) == {"train", "validation", "test"}
        assert sum(len(split) for split in nouns.values()) == 82115
        label_feature = nouns["train"].features["label"]
        assert isinstance(label_feature, datasets.ClassLabel)
        assert label_feature.num_classes == 26
        assert "noun.animal" in label_feature.names
        # Every supersense, including the small noun.Tops and noun.motive, has training examples.
        assert set(nouns["train"]["label"]) == set(range(26))

    def test_noun_split_proportions(self, nouns):
        total = sum(len(split) for split in nouns.values())
        assert 0.78 < len(nouns["train"]) / total < 0.82
        assert 0.09 < len(nouns["validation"]) / total < 0.11
        assert 0.09 < len(nouns["test"]) / total < 0.11

    def test_verb_counts(self):
        verbs = data.load_wordnet_glosses("verb")
        assert sum(len(split) for split in verbs.values()) == 13767
        names = verbs["train"].features["label"].names
        assert len(names) == 15
        assert names[0] == "verb.body"
        assert names[-1] == "verb.weather"
        assert set(verbs["train"]["label"]) == set(range(15))

    def test_text_is_definition_without_examples(self, nouns):
        texts = nouns["train"]["text"]
        assert all(text.strip() == text and text for text in texts)
        # Usage examples start with '; "' in the WordNet gloss and are cut off.
        assert not any('; "' in text for text in texts)
        assert "an entity that has physical existence" in texts

    def test_include_lemma(self):
        with_lemma = data.load_wordnet_glosses("verb", include_lemma=True)
        without = data.load_wordnet_glosses("verb")
        for lemma_text, plain_text in zip(with_lemma["test"]["text"][:50], without["test"]["text"][:50]):
            lemma, _, definition = lemma_text.partition(": ")
            assert lemma
            assert definition == plain_text

    def test_labels_match_shipped_file(self, nouns):
        rows = [row for row in read_shipped_rows("noun") if row["split"] == "validation"]
        names = nouns["validation"].features["label"].names
        assert [names[label] for label in nouns["validation"]["label"]] == [row["lexname"] for row in rows]

    def test_splits_partition_synsets(self):
        rows = read_shipped_rows("noun")
        offsets = [row["synset_offset"] for row in rows]
        assert len(set(offsets)) == len(offsets)
        assert {row["split"] for row in rows} == {"train", "validation", "test"}

    def test_split_determined_by_offset(self):
        build = load_build_script()
        for pos in ("noun", "verb"):
            for row in read_shipped_rows(pos)[:2000]:
                assert build.assign_split(pos, row["synset_offset"]) == row["split"]

    def test_loading_is_deterministic(self, nouns):
        again = data.load_wordnet_glosses("noun")
        for split in nouns:
            assert again[split]["text"] == nouns[split]["text"]
            assert again[split]["label"] == nouns[split]["label"]

    @pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="Debian's wordnet-base is not installed")
    def test_build_script_reproduces_shipped_files(self, tmp_path):
        build = load_build_script()
        build.main(["--output_dir", str(tmp_path)])
        for file_name in data.WORDNET_FILES.values():
            assert (tmp_path / file_name).read_bytes() == (data.PACKAGE_DATA_DIR / file_name).read_bytes()
        assert "Princeton University" in (tmp_path / "LICENSE-wordnet").read_text()

    def test_licence_shipped(self):
        licence = (data.PACKAGE_DATA_DIR / "LICENSE-wordnet").read_text()
        assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence
        assert "Permission to use, copy, modify and distribute" in licence

    def test_invalid_pos(self):
        with pytest.raises(ValueError, match="'adjective'"):
            data.load_wordnet_glosses("adjective")

    def test_missing_data_dir(self, tmp_path):
        with pytest.raises(data.DatasetUnavailableError, match="build_wordnet_data.py"):
            data.load_wordnet_glosses("noun", data_dir=tmp_path / "nowhere")


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_wordnet_data", REPO_ROOT / "scripts" / "build_wordnet_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------


@needs_fashion_mnist
class TestFashionMnist:
    def test_split_sizes(self, fashion_mnist):
        assert {name: len(split) for name, split in fashion_mnist.items()} == {
            "train": 54000,
            "validation": 6000,
            "test": 10000,
        }

    def test_images_and_labels(self, fashion_mnist):
        example = fashion_mnist["test"][0]
        image = np.asarray(example["image"])
        assert example["image"].mode == "L"
        assert image.shape == (28, 28)
        assert image.dtype == np.uint8
        assert image.max() > 100
        features = fashion_mnist["train"].features
        assert isinstance(features["image"], datasets.Image)
        assert features["label"].names == data.FASHION_MNIST_LABELS
        # The official test set starts with an ankle boot (label 9).
        assert example["label"] == 9

    def test_validation_is_stratified(self, fashion_mnist):
        # Fashion-MNIST has 6,000 training images per class, so a stratified 6,000 split has 600 per class.
        validation_counts = collections.Counter(fashion_mnist["validation"]["label"])
        train_counts = collections.Counter(fashion_mnist["train"]["label"])
        assert validation_counts == {label: 600 for label in range(10)}
        assert train_counts == {label: 5400 for label in range(10)}

    def test_named_dataset_uses_local_files(self):
        small = data.load_named_dataset("fashion_mnist", data_dir=FASHION_MNIST_DIR)
        assert len(small["test"]) == 10000


class TestTrainValidationSplit:
    def test_disjoint_and_deterministic(self):
        rows = datasets.Dataset.from_dict(
            {"id": list(range(1000)), "label": [i % 10 for i in range(1000)]},
            features=datasets.Features({"id": datasets.Value("int64"), "label": datasets.ClassLabel(num_classes=10)}),
        )
        train, validation = data._split_train_validation(rows, 100)
        train_again, validation_again = data._split_train_validation(rows, 100)
        assert validation["id"] == validation_again["id"]
        assert train["id"] == train_again["id"]
        assert not set(train["id"]) & set(validation["id"])
        assert sorted(list(train["id"]) + list(validation["id"])) == list(range(1000))


class TestFashionMnistErrors:
    def test_missing_dir(self, tmp_path):
        with pytest.raises(data.DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
            data.load_fashion_mnist(data_dir=tmp_path)

    def test_missing_dir_through_name(self, tmp_path):
        with pytest.raises(data.DatasetUnavailableError, match="t10k-labels-idx1-ubyte.gz"):
            data.load_named_dataset("fashion_mnist", data_dir=tmp_path)

    def test_corrupt_idx_file(self, tmp_path):
        for image_file, label_file in data.FASHION_MNIST_FILES.values():
            with gzip.open(tmp_path / image_file, "wb") as handle:
                handle.write(b"not an idx file")
            with gzip.open(tmp_path / label_file, "wb") as handle:
                handle.write(b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02")
        with pytest.raises(ValueError, match="not an IDX file"):
            data.load_fashion_mnist(data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# Digits and dispatch by name
# --------------------------------------------------------------------------------------------------


class TestDigits:
    def test_shape_and_range(self):
        digits = data.load_digits_28()
        assert len(digits) == 1797
        images = np.stack([np.asarray(image) for image in digits["image"]])
        assert images.shape == (1797, 28, 28)
        assert images.dtype == np.uint8
        assert images.min() == 0
        assert images.max() > 240
        assert digits.features["label"].names == [str(i) for i in range(10)]
        assert set(digits["label"]) == set(range(10))

    def test_named_splits(self):
        splits = data.load_named_dataset("digits")
        again = data.load_named_dataset("digits")
        assert sum(len(split) for split in splits.values()) == 1797
        assert len(splits["test"]) == 180
        for name in splits:
            assert splits[name]["label"] == again[name]["label"]

    def test_named_rejects_kwargs(self):
        with pytest.raises(ValueError, match="data_dir"):
            data.load_named_dataset("digits", data_dir="/tmp")


class TestLoadNamedDataset:
    def test_wordnet_names(self):
        verbs = data.load_named_dataset("wordnet_verbs")
        assert verbs["train"].features["label"].num_classes == 15

    def test_unknown_name_offline(self):
        with pytest.raises(data.DatasetUnavailableError, match="wordnet_nouns, wordnet_verbs, fashion_mnist, digits"):
            data.load_named_dataset("no-such-dataset-anywhere")

    def test_other_names_go_to_load_dataset(self, tmp_path):
        csv_path = tmp_path / "train.csv"
        csv_path.write_text("text,label\nhello,0\nworld,1\n")
        loaded = data.load_named_dataset("csv", data_files={"train": str(csv_path)})
        assert loaded["train"]["text"] == ["hello", "world"]

"""Real data sets that run offline: WordNet glosses, Fashion-MNIST and scikit-learn digits.

Every loader returns `datasets` objects with the columns the Hub's versions use, so training code does not
need to know where the data came from:

- text: `text` (str) and `label` (`ClassLabel`),
- images: `image` (a `datasets.Image` feature, decoded to 28x28 grayscale PIL images of mode "L", the type
  that transformers image processors and the Hub's "fashion_mnist" data set use) and `label` (`ClassLabel`).

WordNet glosses come from files shipped in `attn_temp/data` (derived from WordNet 3.0 by
`scripts/build_wordnet_data.py`, licence in `attn_temp/data/LICENSE-wordnet`), so a fresh install needs no
download. Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package or from the Hub.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

WORDNET_FILES = {"noun": "wordnet_noun.tsv.gz", "verb": "wordnet_verb.tsv.gz"}
# Supersense (lexicographer file) names of WordNet 3.0, in lexicographer file order, from lexnames(5WN).
# The order fixes the label ids: label 0 of the nouns is noun.Tops, label 0 of the verbs is verb.body.
WORDNET_SUPERSENSES = {
    "noun": [
        "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
        "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
        "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
        "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
        "noun.substance", "noun.time",
    ],
    "verb": [
        "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
        "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
        "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    ],
}

FASHION_MNIST_LABELS = [
    # The label names of the Hub's "fashion_mnist" data set, so both sources give identical features.
    "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_HUB_IDS = ("zalando-datasets/fashion_mnist", "fashion_mnist")
# Size of the validation split carved out of the 60,000 Fashion-MNIST training images.
FASHION_MNIST_VALIDATION_SIZE = 6000
SPLIT_SEED = 0

BUILTIN_DATASETS = ("wordnet_nouns", "wordnet_verbs", "fashion_mnist", "digits")
DEFAULT_TEXT_DATASET = "wordnet_nouns"
DEFAULT_IMAGE_DATASET = "fashion_mnist"


class DatasetUnavailableError(FileNotFoundError):
    """A data set that is neither installed locally nor reachable on the Hub."""


# --------------------------------------------------------------------------------------------------
# WordNet glosses
# --------------------------------------------------------------------------------------------------


def load_wordnet_glosses(
    pos: str = "noun", *, data_dir: str | os.PathLike | None = None, include_lemma: bool = False
):
    """Load WordNet 3.0 glosses labelled with their supersense as a `datasets.DatasetDict`.

    There is one example per synset: 82,115 nouns in 26 supersenses (noun.Tops to noun.time) or 13,767 verbs
    in 15 supersenses (verb.body to verb.weather). The train/validation/test split (80/10/10) is stored in
    the shipped files and comes from a hash of the synset offset, so it is the same on every machine.

    Args:
        pos (`str`, defaults to `"noun"`): `"noun"` or `"verb"`.
        data_dir (`str` or `os.PathLike`, *optional*): folder with `wordnet_{pos}.tsv.gz` as written by
            `scripts/build_wordnet_data.py`. Defaults to the copy shipped inside the package.
        include_lemma (`bool`, defaults to `False`): when true, `text` is "lemma: definition" (for example
            "dog: a member of the genus Canis ..."), otherwise the definition alone. The usage examples of a
            gloss are never included.

    Returns:
        `datasets.DatasetDict` with splits "train", "validation" and "test", each with columns `text`
        (`string`) and `label` (`ClassLabel` whose names are the supersenses, e.g. "noun.animal").
    """
    import datasets

    if pos not in WORDNET_FILES:
        raise ValueError(f"`pos` must be 'noun' or 'verb', got {pos!r}.")
    path = Path(data_dir if data_dir is not None else PACKAGE_DATA_DIR) / WORDNET_FILES[pos]
    if not path.is_file():
        raise DatasetUnavailableError(
            f"WordNet gloss file {path} not found. It ships inside the attn_temp package; reinstall it "
            "(`pip install -e .`) or rebuild it with `python scripts/build_wordnet_data.py` where Debian's "
            "wordnet-base package is installed (`apt-get install wordnet-base`)."
        )

    names = WORDNET_SUPERSENSES[pos]
    label_ids = {name: i for i, name in enumerate(names)}
    columns = {split: {"text": [], "label": []} for split in ("train", "validation", "test")}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
            split, lexname = row["split"], row["lexname"]
            if split not in columns or lexname not in label_ids:
                raise ValueError(
                    f"{path}, line {line_number}: unexpected split {split!r} or supersense {lexname!r}; "
                    "rebuild the file with scripts/build_wordnet_data.py."
                )
            text = f"{row['lemma']}: {row['definition']}" if include_lemma else row["definition"]
            columns[split]["text"].append(text)
            columns[split]["label"].append(label_ids[lexname])

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(data, features=features) for split, data in columns.items()}
    )


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _image_features(label_names):
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=label_names)})


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format) of unsigned bytes."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
    # big-endian uint32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes with {expected_ndim} dimensions.")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * expected_ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} contains {data.size} bytes of data but its header declares shape {shape}; the file is truncated or corrupt.")
    return data.reshape(shape)


def _split_train_validation(train, validation_size: int):
    """Split a training set into train/validation, stratified by label and seeded, so it is deterministic."""
    parts = train.train_test_split(
        test_size=validation_size, seed=SPLIT_SEED, stratify_by_column="label", shuffle=True
    )
    return parts["train"], parts["test"]


def load_fashion_mnist(*, data_dir: str | os.PathLike = DEFAULT_FASHION_MNIST_DIR):
    """Load Fashion-MNIST from its IDX files (Debian's `dataset-fashion-mnist` package installs them).

    The 60,000 training images are split into 54,000 train and 6,000 validation images, stratified by label
    with a fixed seed. The 10,000 test images form the test split.

    Args:
        data_dir (`str` or `os.PathLike`, defaults to `/usr/share/datasets/fashion-mnist`): folder with
            `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and
            `t10k-labels-idx1-ubyte.gz`.

    Returns:
        `datasets.DatasetDict` with splits "train", "validation" and "test", columns `image` (28x28 PIL
        images, mode "L") and `label` (`ClassLabel` with the 10 Fashion-MNIST class names).
    """
    import datasets
    from PIL import Image

    data_dir = Path(data_dir)
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (data_dir / name).is_file()]
    if missing:
        raise DatasetUnavailableError(
            f"Fashion-MNIST files {missing} not found in {data_dir}. Install them with "
            "`apt-get install dataset-fashion-mnist`, pass the folder that contains them as `data_dir`, or "
            "use the Hub's copy with `--dataset_name zalando-datasets/fashion_mnist` when the Hub is reachable."
        )

    features = _image_features(FASHION_MNIST_LABELS)
    splits = {}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        images = _read_idx(data_dir / image_file, expected_ndim=3)
        labels = _read_idx(data_dir / label_file, expected_ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"{data_dir}: {image_file} has {len(images)} images but {label_file} has {len(labels)} labels.")
        logger.info("Read %d Fashion-MNIST %s images from %s", len(images), split, data_dir)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(image, mode="L") for image in images], "label": labels.tolist()},
            features=features,
        )

    train, validation = _split_train_validation(splits["train"], FASHION_MNIST_VALIDATION_SIZE)
    return datasets.DatasetDict({"train": train, "validation": validation, "test": splits["test"]})


def load_digits_28():
    """Load scikit-learn's 1,797 handwritten digits as 28x28 grayscale images, like Fashion-MNIST.

    The 8x8 images with values 0..16 are scaled to 0..255 (uint8) and resized to 28x28 with bilinear
    interpolation, without the 4-pixel border that MNIST adds. It serves as an out-of-distribution set for
    models trained on Fashion-MNIST.

    Returns:
        `datasets.Dataset` with columns `image` (PIL images, mode "L") and `label` (`ClassLabel` "0".."9").
    """
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = [Image.fromarray(image, mode="L").resize((28, 28), Image.Resampling.BILINEAR) for image in scaled]
    return datasets.Dataset.from_dict(
        {"image": images, "label": digits.target.tolist()},
        features=_image_features([str(digit) for digit in range(10)]),
    )


def _split_digits(dataset):
    """Split the digits 80/10/10 into train/validation/test, stratified and seeded."""
    import datasets

    first = dataset.train_test_split(test_size=0.2, seed=SPLIT_SEED, stratify_by_column="label")
    second = first["test"].train_test_split(test_size=0.5, seed=SPLIT_SEED, stratify_by_column="label")
    return datasets.DatasetDict({"train": first["train"], "validation": second["train"], "test": second["test"]})


def _load_fashion_mnist_from_hub(**kwargs):
    """Load the Hub's Fashion-MNIST and give it the same validation split as the Debian files."""
    # NOTE: untested, because the tests run without the Hub. The validation split equals the Debian one only
    # if the Hub's train split keeps the original IDX order.
    import datasets

    errors = []
    for hub_id in FASHION_MNIST_HUB_IDS:
        try:
            hub = datasets.load_dataset(hub_id, **kwargs)
        except (ConnectionError, FileNotFoundError) as err:
            errors.append(f"{hub_id}: {err}")
            continue
        train, validation = _split_train_validation(hub["train"], FASHION_MNIST_VALIDATION_SIZE)
        return datasets.DatasetDict({"train": train, "validation": validation, "test": hub["test"]})
    raise DatasetUnavailableError(
        f"Fashion-MNIST is not installed in {DEFAULT_FASHION_MNIST_DIR} and the Hub is not reachable "
        f"({'; '.join(errors)}). Install it with `apt-get install dataset-fashion-mnist`, or run with Hub access."
    )


# --------------------------------------------------------------------------------------------------
# Dispatch by name
# --------------------------------------------------------------------------------------------------


def load_named_dataset(name: str, **kwargs):
    """Load a built-in data set by name, or pass any other name to `datasets.load_dataset` unchanged.

    Built-in names:
        - "wordnet_nouns": WordNet noun glosses, 26 supersenses (keyword arguments go to
          `load_wordnet_glosses`, e.g. `include_lemma=True`).
        - "wordnet_verbs": WordNet verb glosses, 15 supersenses.
        - "fashion_mnist": Debian's Fashion-MNIST files when installed (`data_dir=` to point elsewhere),
          otherwise the Hub's "zalando-datasets/fashion_mnist" or "fashion_mnist" with the same splits.
        - "digits": scikit-learn digits at 28x28, split 80/10/10 into train/validation/test.

    Returns:
        `datasets.DatasetDict` for the built-in names, and whatever `datasets.load_dataset` returns otherwise.

    Raises:
        DatasetUnavailableError: the data set is neither built in, installed, nor reachable on the Hub.
    """
    import datasets

    if name == "wordnet_nouns":
        return load_wordnet_glosses("noun", **kwargs)
    if name == "wordnet_verbs":
        return load_wordnet_glosses("verb", **kwargs)
    if name == "digits":
        if kwargs:
            raise ValueError(f"The 'digits' data set takes no keyword arguments, got {sorted(kwargs)}.")
        return _split_digits(load_digits_28())
    if name == "fashion_mnist":
        data_dir = kwargs.pop("data_dir", None)
        if data_dir is not None or Path(DEFAULT_FASHION_MNIST_DIR).is_dir():
            return load_fashion_mnist(data_dir=data_dir or DEFAULT_FASHION_MNIST_DIR)
        logger.info("No Fashion-MNIST files in %s; trying the Hub.", DEFAULT_FASHION_MNIST_DIR)
        return _load_fashion_mnist_from_hub(**kwargs)

    try:
        return datasets.load_dataset(name, **kwargs)
    except (ConnectionError, FileNotFoundError) as err:
        # `datasets` raises ConnectionError when the Hub is offline and DatasetNotFoundError (a
        # FileNotFoundError) when the name does not exist there.
        raise DatasetUnavailableError(
            f"Data set {name!r} is not a built-in data set and `datasets.load_dataset` could not load it: {err}. "
            f"Built-in data sets that work offline: {', '.join(BUILTIN_DATASETS)}. Other names must be Hub ids "
            "(with the Hub reachable), local folders or loader names such as 'csv' with `data_files`."
        ) from err

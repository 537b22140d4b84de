"""Worker for test_measure_distributed.py: measure the same glosses in one process and across processes.

Launch: HF_HUB_OFFLINE=1 torchrun --nproc_per_node 2 tests/measure_distributed_worker.py MODEL_DIR OUTPUT_DIR

Each process writes OUTPUT_DIR/rank_<r>.json with, per data-set size, the distributed report (through
`accelerator.prepare`d dataloaders, so the last batch is padded with repeated samples), the single-process
report on the full data, the extracted labels, and the result of `FeatureStatistics.sync` on split rows.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from attn_temp import patch_model  # noqa: E402
from attn_temp.data import load_wordnet_glosses  # noqa: E402
from attn_temp.measure import extract_features, measure_representations  # noqa: E402
from attn_temp.metrics import FeatureStatistics  # noqa: E402

# 70 glosses in batches of 4 make 18 batches (9 per process), the last holding 2 glosses; 66 make 17
# batches, so one process gets a whole batch of repeated samples.
DATA_SIZES = (70, 66)
BATCH_SIZE = 4


def sync_check(accelerator) -> dict:
    """Sum FeatureStatistics over processes that each saw a different share of the rows."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(90, 12, generator=generator, dtype=torch.float64) + 20.0
    labels = torch.randint(0, 3, (90,), generator=generator)
    # Uneven shares, and rank 1's shift differs from rank 0's.
    share = slice(0, 30) if accelerator.process_index == 0 else slice(30, 90)
    local = FeatureStatistics()
    local.update(rows[share], labels[share])
    synced = local.sync(accelerator).compute()
    synced_collapse = local.sync(accelerator).compute_neural_collapse()
    whole = FeatureStatistics()
    whole.update(rows, labels)
    return {
        "synced_singular_values": synced.singular_values.tolist(),
        "whole_singular_values": whole.compute().singular_values.tolist(),
        "synced_count": synced.num_samples,
        "synced_nc1": synced_collapse["nc1"],
        "whole_nc1": whole.compute_neural_collapse()["nc1"],
    }


def main(model_dir: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    # 66 or 70 glosses are fewer than MiniLM's 384 features; the rank bound is expected here.
    warnings.filterwarnings("ignore", message="Fewer samples than features")
    accelerator = Accelerator(cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    patch_model(model, head_temperature=2.0)
    collator = DataCollatorWithPadding(tokenizer)
    split = load_wordnet_glosses("noun")["validation"].shuffle(seed=1)

    results = {"num_processes": accelerator.num_processes, "sizes": {}, "sync": sync_check(accelerator)}
    prepared_model = accelerator.prepare(model)
    for size in DATA_SIZES:
        data = split.select(range(size)).map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=32),
            batched=True,
            remove_columns=["text"],
        )
        data = data.rename_column("label", "labels")
        sharded = accelerator.prepare(DataLoader(data, batch_size=BATCH_SIZE, collate_fn=collator))
        distributed = measure_representations(prepared_model, sharded, accelerator=accelerator)
        extracted = extract_features(prepared_model, sharded, accelerator=accelerator)
        single = measure_representations(model, DataLoader(data, batch_size=BATCH_SIZE, collate_fn=collator))
        results["sizes"][str(size)] = {
            "distributed": distributed.to_dict(full_spectrum=True),
            "single": single.to_dict(full_spectrum=True),
            "extracted_labels": extracted.labels.tolist(),
            "extracted_rows": extracted.features["layer_3"].shape[0],
            "dataset_labels": list(data["labels"]),
        }

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"rank_{accelerator.process_index}.json"), "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

#!/usr/bin/env python
# Copyright 2025 The attn_temp developers. Licensed under the Apache License, Version 2.0.
#
# Fine-tune all-MiniLM-L6-v2 (or train a small ViT from scratch) at a chosen softmax temperature, measure
# the rank of every layer during training, and write a Hub model card. Runs on CPU or GPU, one process or
# several; every default works offline.
#
#   # The default job: all-MiniLM-L6-v2 on WordNet noun supersenses, 8,000 glosses, one epoch.
#   python scripts/finetune.py --output_dir outputs/minilm_T1
#
#   # Head temperature 8 and attention temperature 2 in every layer, through accelerate.
#   accelerate launch scripts/finetune.py --head_temperature 8 --attention_temperature 2 --output_dir outputs/minilm_T8
#
#   # One attention temperature per layer (6 layers), learnable.
#   python scripts/finetune.py --attention_temperature 1,1,2,2,4,4 --learnable_temperature --output_dir outputs/minilm_learn
#
#   # A ViT trained from scratch on Fashion-MNIST.
#   python scripts/finetune.py --dataset_name fashion_mnist --model_config hidden_size=128,num_hidden_layers=4 \
#       --num_train_epochs 3 --output_dir outputs/vit_T1
#
#   # Two data-parallel processes on CPU. torchrun, not `accelerate launch --cpu --num_processes 2`, which
#   # starts a single process on CPU (accelerate 1.16).
#   torchrun --nproc_per_node 2 scripts/finetune.py --output_dir outputs/minilm_ddp
#
#   # Checkpoint every 100 steps, then continue an interrupted run.
#   python scripts/finetune.py --checkpointing_steps 100 --output_dir outputs/minilm_T1
#   python scripts/finetune.py --resume_from_checkpoint latest --output_dir outputs/minilm_T1
#
#   # List what --push_to_hub would upload, then upload it.
#   python scripts/finetune.py --push_to_hub --dry_run --output_dir outputs/minilm_T1 --overwrite_output_dir
#   python scripts/finetune.py --push_to_hub --hub_model_id user/minilm-T1 --output_dir outputs/minilm_T1_hub

import logging
import sys

from attn_temp.cards import PushToHubError
from attn_temp.training import CARD_FILE, CheckpointError, parse_args, training_function, validate_args


def main(argv=None) -> int:
    # ----- ARGUMENTS: every check runs before any long work -----
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # transformers and datasets log every weight load and map; keep their warnings only.
    for name in ("transformers", "datasets", "httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        validate_args(args)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # ----- TRAINING, MEASUREMENT, SAVING -----
    try:
        metrics = training_function(args)
    except PushToHubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    # ----- SUMMARY (training_function logs on the main process only; print the same way) -----
    from accelerate import PartialState

    if PartialState().is_main_process:
        test = metrics["test_accuracy"]
        print(
            f"validation accuracy {metrics['eval_accuracy']:.4f}"
            + (f", test accuracy {test:.4f}" if test is not None else "")
            + f", head T={metrics['temperatures']['head_temperature']}"
        )
        push = metrics.get("push")
        if push and push.get("dry_run"):
            print(f"Dry run: {len(push['files'])} files, {push['total_bytes']} bytes would go to {push['repo_id']}:")
            for item in push["files"]:
                print(f"  {item['size']:>12}  {item['path']}")
        elif push:
            print(f"Pushed to {push['repo_id']}: {push['commit_url']}")
        print(f"Model card: {args.output_dir}/{CARD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

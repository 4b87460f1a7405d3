# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kpod-installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install browser demo test test-fast serve bench clean

# torch comes from the local CPU wheel and fastapi stays < 0.151: both pinned in constraints.txt
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# the deployment test screenshots the Prefect UI with headless Chromium from Debian's packages
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(BIN)/kpod demo

# The tests run tiny models, sometimes two processes at once (accelerate, a server and its
# client): one intra-op thread each avoids OpenMP threads fighting over 2 cores.
test: install browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q

test-fast: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m "not e2e"

serve: install
	$(BIN)/kpod serve

bench: install
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/teacher_throughput.py

clean:
	rm -rf kpod-store

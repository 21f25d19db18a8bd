# dlpipe: `make demo` and `make test` each set up everything from Python 3.11 + Java 17.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dlpipe-installed
DEMO_CONF ?= conf/digits_cnn.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test bench check-java venv clean lock

check-java:
	@command -v java >/dev/null 2>&1 || { echo "dlpipe needs Java 17 for Spark: no 'java' on PATH (install OpenJDK 17, e.g. apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1); \
	  [ "$$v" = "17" ] || { echo "dlpipe needs Java 17 for Spark; found Java '$$v' (set JAVA_HOME or PATH to a Java 17)" >&2; exit 1; }

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "dlpipe needs Python 3.11: '$(PYTHON)' not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

venv: $(STAMP)

demo: check-java $(STAMP)
	$(BIN)/dlpipe demo $(DEMO_CONF)

test: check-java $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every benchmark, then BENCHMARKS.md rewritten from bench/results/*.json (BENCH_ARGS=--quick: tiny sizes, runs/bench/quick/).
bench: check-java $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Re-pin the envelope after a deliberate dependency change (review the diff of constraints.txt).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > constraints.txt

clean:
	rm -rf runs spark-warehouse metastore_db derby.log .pytest_cache

# minitrain — two commands do all the set-up: `make demo` and `make test`.
# Every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.minitrain-installed
# torch is pinned; on the course machines pip takes this exact file from local disk.
DEPS   := torch==2.13.0 numpy matplotlib pytest hypothesis tqdm

.PHONY: venv demo test lessons animations bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(DEPS)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: venv
	$(BIN)/python -m minitrain.demo

test: venv
	$(BIN)/python -m pytest

lessons: venv
	@set -e; for f in lessons/[0-9][0-9]_*.py; do \
		echo "=== $$f"; $(BIN)/python $$f; done

animations: venv
	@set -e; for f in animations/[a-z]*.py; do \
		case $$f in */deck.py) continue;; esac; \
		echo "=== $$f"; MPLBACKEND=Agg $(BIN)/python $$f; done

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs .pytest_cache .hypothesis

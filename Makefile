# minitrain — two commands do all the set-up: `make demo` and `make test`.
# Every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.minitrain-installed
# torch is pinned; on the course machines pip takes this exact file from local disk.
DEPS   := torch==2.13.0 numpy matplotlib pytest hypothesis tqdm
# Scripts that plot write files only: no window, no display needed (lessons, animations, bench,
# demo). Exported once here instead of a matplotlib.use() in every script.
export MPLBACKEND := Agg

.PHONY: venv demo test lessons animations bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(DEPS)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: venv
	$(BIN)/python -m minitrain.demo
	$(BIN)/python -m benchmarks.demo_figure

test: venv
	$(BIN)/python -m pytest

lessons: venv
	@set -e; for f in lessons/[0-9][0-9]_*.py; do \
		echo "=== $$f"; $(BIN)/python $$f; done

animations: venv
	@set -e; for f in animations/[a-z]*.py; do \
		case $$f in */deck.py) continue;; esac; \
		echo "=== $$f"; $(BIN)/python $$f; done

bench: venv
	$(BIN)/python benchmarks/run_all.py $(if $(QUICK),--quick)

clean:
	rm -rf outputs .pytest_cache .hypothesis

# --- exercises (begin)
# The property tests grade your own implementation (tests/exercises.py; README "Exercises").
# Your files live in exercises/ (git-ignored). NAME is an exercise name from `make exercises`.
.PHONY: exercises exercise check hint solution
exercises: venv
	@$(BIN)/python tests/exercises.py list
exercise: venv
	@$(BIN)/python tests/exercises.py new $(NAME)
check: venv
	@$(BIN)/python tests/exercises.py check $(NAME)
hint: venv
	@$(BIN)/python tests/exercises.py hint $(NAME)
solution: venv
	@$(BIN)/python tests/exercises.py solution $(NAME)
# --- exercises (end)

# --- speedrun (begin)
# The course's thesis on this machine: the demo's recipe, then one technique at a time, timed to
# the demo's validation loss (benchmarks/bench_speedrun.py; QUICK=1 for a one-minute smoke run).
.PHONY: speedrun
speedrun: venv
	$(BIN)/python benchmarks/bench_speedrun.py $(if $(QUICK),--quick)
# --- speedrun (end)

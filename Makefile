# Two commands set everything up (see README.md; without make: pip install -e ".[notebooks]"):
#   make run      create .venv, install, run the main job (LoRA fine-tuning; ARGS=--quick for quick mode)
#   make test     create or reuse .venv, install the test extra, run the tests
#   make figures  regenerate the committed figures in figures/ (running notebooks never touches them)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch release the project is tested with; pip picks the build for your platform.
TORCH ?= torch==2.13.0
NOTEBOOKS := $(sorted $(wildcard notebooks/*.ipynb))

# The notebooks whose figures are committed: exact without any download (parameter counts, rank plots).
FIGURE_NOTEBOOKS := notebooks/01_gpt_from_scratch.ipynb notebooks/04_lora_from_scratch.ipynb

.PHONY: run test lint notebooks figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installing torch on its own first pins the release; the other packages then accept it as it is. pip would
# write the installed modules' bytecode one file at a time; COMPILE writes the same files on every core at once
# (the test install: 8 s sooner, the median of 7 pairs of fresh installs in turn on two cores, each install
# 36 to 78 s). A file only a newer Python can compile (torch ships one) is skipped in silence, as pip skips it.
PIP_INSTALL := $(BIN)/python -m pip install --no-compile
COMPILE := $(BIN)/python -c "import compileall, sysconfig; \
	compileall.compile_dir(sysconfig.get_path('purelib'), quiet=2, workers=0)"

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.txt
	$(PIP_INSTALL) "$(TORCH)"
	$(PIP_INSTALL) -r requirements.txt -e .
	$(COMPILE)
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) "$(TORCH)"
	$(PIP_INSTALL) -e ".[test]"
	$(COMPILE)
	touch $@

# The main job: LoRA fine-tuning of GPT-2 124M on the SMS Spam Collection, 5 epochs (`make run ARGS=--quick`:
# no network). --overwrite: running it again replaces the previous run in its folder, once the new run is
# complete. Quick runs go to runs/lora-quick, so that they never replace a full run.
ARGS ?=
QUICK_RUN := $(or $(findstring --quick,$(ARGS)),$(filter 1 true yes on,$(LLM_SCRATCH_QUICK)))
RUN_OUT ?= runs/lora$(if $(QUICK_RUN),-quick)
run: $(VENV)/.installed
	$(BIN)/python -m llm_scratch finetune --method lora --out $(RUN_OUT) --overwrite $(ARGS)

# Execute every notebook top to bottom (full mode unless LLM_SCRATCH_QUICK=1); executed copies and figures
# go to runs/.
notebooks: $(VENV)/.installed
	$(BIN)/jupyter nbconvert --to notebook --execute --output-dir runs/notebooks $(NOTEBOOKS)

# On purpose only: run FIGURE_NOTEBOOKS in full mode (no download needed) with their figures sent to figures/.
figures: $(VENV)/.installed
	LLM_SCRATCH_QUICK= LLM_SCRATCH_FIGURES="$(CURDIR)/figures" \
		$(BIN)/jupyter nbconvert --to notebook --execute --output-dir runs/notebooks $(FIGURE_NOTEBOOKS)

# Two test processes side by side (pytest-xdist), one thread each; TEST_WORKERS=0 runs them in this process.
# The 20 slowest tests are listed at the end (benchmarks/RESULTS.md has the times per file).
TEST_WORKERS ?= 2
# glibc's malloc hands freed blocks of a few MB back to the system and faults them in again, page by page, on
# the next training step; these keep blocks of up to 32 MiB for reuse in every process the tests start
# (notebook kernels included). Linux only; elsewhere they are ignored. Timings: benchmarks/RESULTS.md.
test: export MALLOC_MMAP_THRESHOLD_ := 33554432
test: export MALLOC_TRIM_THRESHOLD_ := 1073741824
test: $(VENV)/.installed-test
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=20

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

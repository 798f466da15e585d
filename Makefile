# streamcnn — two commands do everything on a fresh machine:
#   make verify   set up .venv and run the equivalence proofs (verify/)
#   make bench    set up .venv and regenerate reports/ (QUICK=1 for a smoke run, which
#                 writes into reports/_raw/quick/ instead, about 200 MB, and leaves reports/ as it is;
#                 REPEAT=fig2,fig3 to measure those points again and compare,
#                 RESUME=1 to keep what an interrupted run measured cleanly)
#   make demo     set up .venv and regenerate the teaching figures in reports/
#
# TORCH_SPEC picks the torch build. The default is the CPU wheel this project is
# developed on. GPU users, e.g.:
#   make verify TORCH_SPEC="torch" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124" EXTRAS=dev,slides,gpu

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= dev,demo,slides
QUICK       ?=
REPEAT      ?=
RESUME      ?=
comma       := ,
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: verify bench demo clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

verify: $(STAMP)
	$(PY) -m pytest verify -q

bench: $(STAMP)
	$(PY) -m bench $(if $(QUICK),--quick,) $(if $(REPEAT),--repeat $(REPEAT),) $(if $(RESUME),--resume,)

demo: $(STAMP)
	$(PY) -m demo $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks *.egg-info

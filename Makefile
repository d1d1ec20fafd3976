# lguest: the book and the program.  `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install system-deps tangle docs test check run guest lean-guest bench bed notebooks clean \
        Preparation! Guest Drivers Launcher Host Switcher Mastery Beer

help:
	@echo "make run        set up .venv, tangle, and run lguest (what boots so far)"
	@echo "make check      set up everything the tests need, then run the tests"
	@echo "make tangle     notebooks -> build/lguest (and compile the KVM module)"
	@echo "make docs       weave the book into build/html"
	@echo "make notebooks  run each chapter into build/notebooks/NN_name.ipynb, outputs and all"
	@echo "make test       run the tests (after make install)"
	@echo "make guest      fetch and build the default guest"
	@echo "make lean-guest build the lean guest kernel"
	@echo "make bench      run the Mastery chapter's benchmarks (tables, not tests)"
	@echo "make bed        a shell in the bed: a VM whose KVM runs guest kernels in hardware"
	@echo "make Preparation!  (or Guest, Drivers, Launcher, Host, Switcher, Mastery, Beer)"

# The system's part: a C compiler and KVM's header, venv, and for the tests a browser.
system-deps:
	@bash tools/system-deps.sh

# Python's part: a virtual environment with lguest installed editable.  Editable
# means build/lguest is imported in place, so `make tangle` is all a change needs.
$(STAMP): pyproject.toml setup.py
	@bash tools/system-deps.sh base
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	$(VPY) -m lguest.book.jupyter
	@touch $@

install: $(STAMP)

# Tangle, then rebuild the cffi module only when its build script changed.
tangle:
	@$(PYTHON) tangle.py
	@if [ -x $(VPY) ] && [ -f build/lguest/switcher_build.py ] && \
	    { [ ! -f build/.kvm-module ] || [ build/lguest/switcher_build.py -nt build/.kvm-module ]; }; then \
	    echo "cffi: compiling lguest._kvm"; \
	    $(VPY) build/lguest/switcher_build.py && touch build/.kvm-module; fi

# The chapters boot the lean guest (IV's first boot, VII's traced one): build it first
# where KVM can run it, so no page shows a placeholder.  Once built, it is found at once.
docs: install tangle
	@if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then $(VPY) -m lguest.guest lean; fi
	$(VPY) -m sphinx -W --keep-going -b html -c docs notebooks build/html
	@echo "the guide: build/html/index.html"

# The chapters as Jupyter notebooks with their outputs, run in the lguest kernel.
notebooks: install tangle
	$(VPY) tools/chapter_notebooks.py

test: tangle
	$(VPY) -m pytest -ra --durations=20 $(PYTEST_ARGS)

# The README's two commands.
check: system-deps install test
run: install tangle
	$(VENV)/bin/lguest 256m

guest: install tangle
	$(VPY) -m lguest.guest default

lean-guest: install tangle
	$(VPY) -m lguest.guest lean

# Chapter VII's benchmarks: tables of what things cost on this machine.
bench: install tangle
	@bash tools/system-deps.sh bench
	$(VPY) -m lguest.bench

# The users' kind of KVM (hardware kernel mode), in a VM under QEMU-TCG: tools/bed.py.
bed: install tangle
	@bash tools/system-deps.sh
	$(VPY) tools/bed.py shell

# The original's Makefile printed the quest's chapters; so do we.
Preparation!:
	@$(PYTHON) tools/chapter_text.py 01
Guest:
	@$(PYTHON) tools/chapter_text.py 02
Drivers:
	@$(PYTHON) tools/chapter_text.py 03
Launcher:
	@$(PYTHON) tools/chapter_text.py 04
Host:
	@$(PYTHON) tools/chapter_text.py 05
Switcher:
	@$(PYTHON) tools/chapter_text.py 06
Mastery:
	@$(PYTHON) tools/chapter_text.py 07
Beer:
	@$(PYTHON) tools/chapter_text.py all

clean:
	rm -rf build

# Developer targets. The Debian build uses pybuild (debian/rules), never this file.
#   make fuzz       long coverage-guided campaign (FUZZ_TIME seconds per harness, default 600)
#   make fuzz-ci    short campaign, under a minute in all; CI runs it via tests/test_fuzz_ci.py
#   make bench      pop3sf against a private Dovecot (benchmarks/README.md); bench-quick: small
#   make test       scripts/test (apt, venv, ruff, mypy, pytest)
# Harnesses live in fuzz/ (atheris: pip install atheris). New corpus entries go to
# $(FUZZ_DIR)/<harness>/corpus, crashes to $(FUZZ_DIR)/artifacts/; fuzz/seeds is never written.
PYTHON ?= $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python3)
FUZZ_DIR ?= build/fuzz
FUZZ_TIME ?= 600
FUZZ_CI_TIME ?= 12
HARNESSES ?= session sasl wire proxy
FUZZ_FLAGS ?=

.PHONY: help fuzz fuzz-ci bench bench-quick test

help:
	@sed -n 's/^#   //p' Makefile

define campaign
	@set -e; for h in $(HARNESSES); do \
	  mkdir -p $(FUZZ_DIR)/$$h/corpus $(FUZZ_DIR)/artifacts; \
	  echo "== fuzz/fuzz_$$h.py for $(1) s"; \
	  $(PYTHON) fuzz/fuzz_$$h.py $(FUZZ_DIR)/$$h/corpus fuzz/seeds/$$h \
	    -max_total_time=$(1) -artifact_prefix=$(FUZZ_DIR)/artifacts/$$h- \
	    -print_final_stats=1 $(FUZZ_FLAGS) 2>&1 | grep -v '^#[0-9]' ; \
	  test $${PIPESTATUS[0]} -eq 0 || { echo "== fuzz/fuzz_$$h.py found a crash" >&2; exit 1; }; \
	done
endef

fuzz: SHELL := /bin/bash
fuzz:
	$(call campaign,$(FUZZ_TIME))

fuzz-ci: SHELL := /bin/bash
fuzz-ci:
	$(call campaign,$(FUZZ_CI_TIME))

bench:
	$(MAKE) -C benchmarks bench

bench-quick:
	$(MAKE) -C benchmarks bench-quick

test:
	scripts/test

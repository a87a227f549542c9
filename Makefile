# nicsplit — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DATA   ?= ./nicsplit-data

.PHONY: run test test-fast bench fuzz soak venv system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

# Debian packages of the real NBD peers the tests drive (nbdkit, libnbd, qemu, fio).
system-deps:
	bash scripts/setup-system.sh

run: venv
	$(VENV)/bin/nicsplit --data $(DATA) up

test: system-deps venv
	$(PY) -m pytest -v tests

# The edit-test loop: tests/unit only (no process started; about a minute).
# `make test` still runs everything.
test-fast: system-deps venv
	$(PY) -m pytest -q -m unit tests/unit

bench: system-deps venv
	$(PY) bench/run.py
	$(PY) bench/keepup.py
	$(PY) bench/io_floor.py
	$(PY) bench/wakeup.py
	$(PY) bench/protection.py
	$(PY) bench/transports.py
	$(PY) bench/transports.py --transports none,ring,nvme-pi,shadow --acker-core dedicated --out bench/out/transports-dedicated
	$(PY) bench/overflow.py
	$(PY) bench/recovery.py
	$(PY) bench/distribution.py
	$(PY) bench/distribution.py --rate-iops 6000 --card-idle-spin-us 50 --out bench/out/distribution-paced

# Coverage-guided fuzzing (atheris) of the NBD codec, the wire codec, ring and
# overflow entries, the journal readers and the control protocol, each for
# FUZZ_SECONDS; a failing input is saved under fuzz/out/ (docs/operations.md).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS  = nbd frames ring journal ctl
fuzz: venv
	$(PY) -m pip install -q -e '.[fuzz]'
	mkdir -p fuzz/out
	for t in $(FUZZ_TARGETS); do \
		$(CURDIR)/$(PY) fuzz/fuzz_$$t.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
			-artifact_prefix=fuzz/out/$$t- || exit 1; \
	done

# The fault soak (docs/faults.md): SOAK_CASES randomized fault cases on one
# `nicsplit up`; SEED=S reproduces a run, CASE=K reruns one case of it.
# The summary goes to $(SOAK_OUT) and its .md twin.
SOAK_CASES ?= 200
SOAK_OUT   ?= bench/out/soak.json
soak: system-deps venv
	$(PY) -m nicsplit.testing.soak --cases $(SOAK_CASES) --out $(SOAK_OUT) $(if $(SEED),--seed $(SEED)) $(if $(CASE),--case $(CASE))

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

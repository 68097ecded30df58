# Entry points a newcomer needs; each sets the machine up first (idempotent).
.PHONY: setup test test-fast test-slow run

setup:
	bash scripts/setup.sh

# The suite CI runs, integration tests (packaged models, local Ray) included; not the slow ones.
# In a loopback-only network namespace where one can be made (root): the multi-node tests need it.
test: setup
	scripts/hermetic.sh .venv/bin/python -m pytest -q -m "not slow"

# The tests marked slow: every shipped CPU config through tune and run with the packaged models
# (each over 15 min on a 2-core AVX2 CPU), the paper configs on stand-ins, and tests whose promise
# another in make test guards too (a 4-trial ASHA sweep, an evaluation's node kill, benchmarks').
test-slow: setup
	.venv/bin/python -m pytest -q -m slow

# Unit tests only: tiny from_config models, under a minute.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not integration"

# The main job end to end on real SST-2 with the packaged models (CPU scale).
run: setup
	.venv/bin/dilm-ray run configs/sst2-cpu.yaml

# Entry points a newcomer needs; each sets the machine up first (idempotent).
.PHONY: setup test test-fast run

setup:
	bash scripts/setup.sh

# The whole suite, integration tests (packaged models, local Ray) included.
test: setup
	.venv/bin/python -m pytest -q

# Unit tests only: tiny from_config models, under a minute.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not integration"

# The main job end to end on real SST-2 with the packaged models (CPU scale).
run: setup
	.venv/bin/dilm-ray run configs/sst2-cpu.yaml

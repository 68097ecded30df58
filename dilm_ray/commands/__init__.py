"""Commands: what ``dilm-ray run``, ``evaluate``, ``tune`` and the benchmarks do, over the stages."""

"""dilm-ray: text-level dataset distillation with DiLM, on Ray."""

__version__ = "0.1.0"

"""Every way of making a distilled set, named once.

The config's allowed ``evaluate.baselines``, the CLI's ``--generator`` and ``--method`` choices,
the stage modules and ``benchmarks/glue.py`` derive their lists from ``METHODS``: adding a
method means adding it here and to the stage module that makes its sets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A method of making distilled sets.

    ``generator``: the stage whose generator writes the sets (``pretrain`` or ``distill``), or
    None for a coreset (real train rows picked by a rule); ``deterministic``: one set per DPC
    (the rule has no seed); ``paper``: False for methods beyond DiLM's paper."""

    name: str
    description: str
    generator: str | None = None
    deterministic: bool = False
    paper: bool = True

    @property
    def generated(self) -> bool:
        return self.generator is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dilm", "DiLM: the generator after gradient matching (stage 2)", generator="distill"),
        Method("dilm_filtered", "DiLM's sets selected after the label-consistency filter", generator="distill", paper=False),
        Method("lm_only", "the generator after LM pre-training only (stage 1)", generator="pretrain"),
        Method("random", "real train rows drawn at random"),
        Method("k_centers", "the real train row nearest each K-means centroid of the learner's embeddings"),
        Method("herding", "real train rows by herding on the learner's embeddings", deterministic=True),
    )
}
GENERATED = tuple(m for m, spec in METHODS.items() if spec.generated)  # written by a generator
CORESETS = tuple(m for m, spec in METHODS.items() if not spec.generated)  # real train rows picked by a rule
BASELINES = tuple(m for m in METHODS if m != "dilm")  # what DiLM is compared with


def n_sets(method: str, n_datasets: int) -> int:
    """Sets per DPC of ``method``: ``n_datasets``, or one for a deterministic method (herding)."""
    return 1 if METHODS[method].deterministic else n_datasets

"""The pipeline, a module per stage: ``pretrain``, ``distill``, ``synthesize``, ``coreset`` and
``evaluate`` each declare what they need, make and are keyed by (``base``); ``table`` lists them
in order and plans a run."""

"""The method of *Sampling Matters in Deep Embedding Learning*, over the global batch: samplers, losses and β,
the objective (gather, sample for local anchors, loss share), and what extends a batch: the cross-batch memory
and the class prototypes. Torch only: no process group, DeepSpeed or MLflow (the collectives come from the
DistContext an objective is handed)."""

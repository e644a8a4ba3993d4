"""What every other part stands on: the distributed context (the one module that knows about ranks), the
accelerator and DeepSpeed's build environment, the patches of other libraries' internals, files written whole,
user errors, seeds. Imports nothing else of dist_dml."""

"""A training run: the trainer and its loop, the run's parts (state and hooks), DeepSpeed's engine (the one module
that imports DeepSpeed), one optimizer step, the meter, checkpoints, the output folder, MLflow tracking (the one
module that imports MLflow), the pre-launch check and `dist-dml grid`."""

"""The storage dtypes a config may name for a table kept beside the model (the cross-batch memory, the class
prototypes and their snapshots): one list, read by every section that names one."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

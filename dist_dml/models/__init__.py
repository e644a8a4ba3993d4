"""The embedding model: backbones (a registry of torchvision, timm and a tiny CNN), where their weights come
from (local files, the cache, once-per-node downloads), and the head, normalisation and BatchNorm across ranks."""

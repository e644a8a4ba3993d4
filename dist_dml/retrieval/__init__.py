"""Retrieval: distributed extraction and evaluation, the sharded metrics, post-processing (DBA, QE, k-reciprocal
re-ranking), faiss search and indexes, exported embeddings, index folders, and plots."""

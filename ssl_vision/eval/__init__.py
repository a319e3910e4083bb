"""Evaluation harness: kNN (faiss), linear probe, online monitors. See docs/reference.md §10."""

"""Evaluation harness: kNN (faiss), linear probe, online monitors. See methods.md section 10."""

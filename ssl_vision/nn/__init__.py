"""Reusable layers: projection/prediction heads (heads.py)."""

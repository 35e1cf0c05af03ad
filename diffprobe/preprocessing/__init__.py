"""Preprocessing: crop to body, resample to the planned spacing, normalise, store."""

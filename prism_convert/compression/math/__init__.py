"""The tensor math of compression: take tensors, return tensors (no files, no models, no I/O)."""

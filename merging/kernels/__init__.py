"""Fused per-tensor merges and the pieces they share: counter-based draws and their compiled runner."""

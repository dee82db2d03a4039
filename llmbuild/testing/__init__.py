"""Helpers for tests, benchmarks and tools: local stand-ins for what would come from a model hub."""

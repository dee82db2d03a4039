"""llmbuild: ahead-of-time build system for LLM inference engines."""

__version__ = "0.1.0"

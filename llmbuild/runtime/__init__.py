"""Run side: load an engine, manage its paged KV cache, schedule and sample. Never imports builder/."""

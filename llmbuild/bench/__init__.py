"""What `llmbuild bench` measures: an engine offline, in-process (offline.py), or a live server under
streaming load (load_generator.py)."""

"""Build side: checkpoint import, model graphs, export and packaging into an engine directory."""

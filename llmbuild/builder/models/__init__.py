"""Model graphs, one file per architecture family; they call plugin ops by name."""

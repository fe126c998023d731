"""Qt-free napari glue: layer data tuples, reader/writer commands, sample data."""

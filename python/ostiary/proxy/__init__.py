"""The only Python on the data path: listeners, the startup pump and the engine's event loop."""

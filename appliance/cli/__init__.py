"""The `stem` command line: one module per command group, output rendered in `output`."""

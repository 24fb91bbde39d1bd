"""The process tree: a supervisor, its pools, and their forked children."""

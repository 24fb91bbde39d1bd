"""One contract suite for every store: each test runs against sqlite and redis."""

"""One module per view; each screen reads its own data (`StemScreen.load`)."""

"""`stem tui`: the Textual app over `appliance.observe` and the control client.

The core never imports this package (tests/test_quality.py checks it); `stem tui`
imports it inside its handler."""

from __future__ import annotations

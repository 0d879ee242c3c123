"""Optional adapters to other ecosystems, imported lazily (the core never imports them)."""

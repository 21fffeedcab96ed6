"""The inference engine: torch only, no HTTP or database code."""

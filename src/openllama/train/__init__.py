"""The one training engine and the objectives that plug into it."""

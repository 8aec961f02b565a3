"""Data stages: read corpora, clean, shard, verify, tokenise, pack; chat and preference data."""

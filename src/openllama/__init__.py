"""openllama: from raw corpora to a served chat model."""

__version__ = "0.1.0"

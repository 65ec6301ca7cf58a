"""raysel: pick instruction-tuning data by the SAE features an LLM fires on it."""

__version__ = "0.1.0"

"""lmfleet: raw text to an aligned language model on Ray, one YAML per stage."""

__version__ = "0.1.0"

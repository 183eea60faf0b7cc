"""Adapters on disk and on the Hub: the model card, atomic saving."""

"""Persona post-training: the corpus (data), experts (peft), the router, the recipe and pf-eval."""
from pf_engine.train.data import load_corpus
from pf_engine.train.recipe import Recipe, train_bank

__all__ = ["Recipe", "load_corpus", "train_bank"]

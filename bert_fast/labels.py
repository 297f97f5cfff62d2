"""IGNORE_INDEX: the label of a position no loss, accuracy or metric counts (torch's cross_entropy
default, as Hugging Face uses it). Defined once, below every layer that labels or reads labels."""

IGNORE_INDEX = -100

"""Evaluation: `mmlm eval` (`cli`), batched answering across token budgets (`evaluate`), scoring (`metrics`)."""

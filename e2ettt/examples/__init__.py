"""Worked examples of what e2ettt can take: models that are not the baseline GPT."""

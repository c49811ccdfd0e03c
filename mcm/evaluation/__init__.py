"""Evaluation: metrics, judges, ``mcm evaluate`` and the reports in docs/ (never imports training)."""

"""Evaluation: sliding-window perplexity, per-loop exits, few-shot multiple choice, reports and plots.

``lm_eval_adapter`` (the lm-evaluation-harness model type ``recursify``) needs the ``eval`` extra and
is imported only on demand.
"""

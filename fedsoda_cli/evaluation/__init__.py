"""Evaluation of a model on the client task and on held-out public text.

scoring (label-word log-likelihoods, SST-2/BoolQ), generation (greedy answers, GSM8K exact match),
perplexity (held-out WikiText), task (one entry point per task, TaskScore/Prediction),
stats (95 % intervals), targets (building the plugin / sub / zero-shot models).
"""

"""The shipped study configs (package data of eval_artifacts.study once installed)."""

"""SCAFFOLD: being written."""

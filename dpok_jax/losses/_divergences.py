"""SCAFFOLD: being written; every name below is replaced by its real implementation."""
F_REGISTRY = {}


def divergence(*args, **kwargs):
    raise NotImplementedError("divergence")


def topk_divergence(*args, **kwargs):
    raise NotImplementedError("topk_divergence")


def topk_reference(*args, **kwargs):
    raise NotImplementedError("topk_reference")

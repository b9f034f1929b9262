"""SCAFFOLD: being written; every name below is replaced by its real implementation."""


def chunked_logps_and_divergence(*args, **kwargs):
    raise NotImplementedError("chunked_logps_and_divergence")


def chunked_token_logps(*args, **kwargs):
    raise NotImplementedError("chunked_token_logps")


def sequence_logps(*args, **kwargs):
    raise NotImplementedError("sequence_logps")


def token_logps(*args, **kwargs):
    raise NotImplementedError("token_logps")

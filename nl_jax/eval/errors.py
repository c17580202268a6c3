"""The one error type of the evaluation tasks: bad input, with a message naming the problem."""


class EvalInputError(ValueError):
    """An evaluation cannot run on this input (missing file, bad length, unknown task, ...)."""

"""Errors raised by the suite, each saying what was wrong and what is accepted."""


class UnsupportedPipelineError(TypeError):
    """The pipeline has no denoiser the suite knows how to accelerate."""


class UnsupportedDeviceError(RuntimeError):
    """The pipeline's device cannot run what the config asks (FP8 matmuls on a GPU without FP8 tensor cores)."""


class AlreadyAcceleratedError(RuntimeError):
    """`accelerate` was called on a pipeline that is already accelerated."""


class NotAcceleratedError(RuntimeError):
    """`restore` was called on a pipeline that `accelerate` never touched."""


def check_choice(field: str, value, choices) -> None:
    """Raise a `ValueError` naming the field, the bad value and every valid choice."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{field}={value!r} is not supported; valid choices: {valid}")

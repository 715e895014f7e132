"""The planner's one error type.

Every bad input (unknown preset, config missing a field, negative bandwidth, impossible parallel layout)
raises :class:`PlanError` with a one-line message that names what is wrong; the command line prints it as
``error: ...`` and exits with status 2.
"""


class PlanError(ValueError):
    """A planner input is invalid; the message names the offending preset, field or flag."""

"""The one exception type for bad input.

Library code raises :class:`UserError` with a message that names the file, flag or key at fault and
what to do about it. Scripts turn it into one line on stderr and a non-zero exit (see ``utils.cli``).
"""


class UserError(Exception):
    """Bad input from the user (a path, flag, config key or file content); the message says the fix."""

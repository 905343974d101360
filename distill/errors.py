"""Errors meant for the user: one clear line, exit status 2, no traceback."""


class UserError(Exception):
    """Bad input (recipe, shard, model output, path). The CLI prints ``error: <msg>`` and
    exits with status 2. The message names what is wrong and where."""

    exit_code = 2

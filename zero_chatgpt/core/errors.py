"""The error a user can fix, and the one-line wording of a failed read or write.

A UserError is printed by the CLI as one line, without a traceback, exit status 2; its message says what,
where, and what to do."""
from __future__ import annotations

import errno


class UserError(Exception):
    """An error the user can fix (bad flag, missing input, unknown key).

    The CLI prints it as one line, without a traceback, and exits with status 2.
    The message should say what, where, and what to do.
    """


def os_error_line(e: OSError, then: str = "fix that and run the same command again (finished work and "
                                          "checkpoints are kept)") -> str:
    """One line for a failed read or write: the path, the cause, what to do (`then`: a command that writes no
    run directory, such as export, says what holds for it instead)."""
    where = e.filename or "a file"
    cause = e.strerror or str(e)
    hint = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)",
            errno.EFBIG: "the file size limit (ulimit -f) is too small for it", errno.EROFS: "the file system is read-only",
            errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
            errno.ENOENT: "it does not exist"}.get(e.errno, "")
    return f"cannot write or read {where}: {cause}" + (f" ({hint})" if hint else "") + f"; {then}"

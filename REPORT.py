"""How every script reports and fails: `log` (diagnostics on stderr, stdout being for generated text),
`UserError` (a mistake in the user's input: one line naming the file, key or flag and the fix, exit 2, no
traceback) and the helpers that word such lines. Imports nothing of LLM-MINI and nothing beyond the standard
library, so that any file can report without loading the schema.
"""
import difflib
import importlib
import os
import sys


def log(*a):
    """Diagnostics to stderr. Under torchrun only rank 0 speaks: `RANK` is read from torchrun's environment
    here, not from the run's context (DISTRIBUTED.Run), because files below DISTRIBUTED.py log too (the
    data readers, the token cache) and a process's rank never changes."""
    if os.environ.get("RANK", "0") == "0":
        print(*a, file=sys.stderr, flush=True)


class UserError(Exception):
    """A mistake in the user's input: reported as one line on stderr with exit code 2, no traceback."""


def first_line(error, limit=None):
    """An exception's first line (at most `limit` characters), to quote inside one of our one-line errors."""
    lines = str(error).splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


def suggest(name, candidates):
    """" - did you mean 'x'?" when one of the candidates is close to the name, else ""."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" - did you mean '{close[0]}'?" if close else ""


def need(module, feature, pip_name=None):
    """Import an optional package, or fail in one line saying what needs it and what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        names = (pip_name or module).split()  # one package, or several ("fastapi uvicorn")
        what = f"the {names[0]} package" if len(names) == 1 else f"the {' and '.join(names)} packages"
        raise UserError(f"{feature} needs {what} - pip install {' '.join(names)}")


def main_guard(main):
    """Exit with main(sys.argv[1:])'s return code; a UserError becomes one line on stderr and exit 2 (--debug
    shows the traceback)."""
    argv = sys.argv[1:]
    try:
        code = main(argv)
    except UserError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `… | head` closed stdout: stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code)

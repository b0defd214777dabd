"""A command ends as Python's own exit would end it, only without the teardown (minilora/__init__.py's run_command).

The reference is Python itself: each script below runs once with `sys.exit(main())` and once with
`run_command(main)`, and the two must give the same exit code, stdout and stderr; the output is larger than a
pipe's buffer, and written buffered, so a missing flush would cut it short.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minilora"

SCRIPT = '''
import atexit, sys, threading, time
from minilora import run_command

def late_writer():  # not a daemon: Python waits for it before exiting
    time.sleep(0.3)
    print("thread done")

def main():
    threading.Thread(target=late_writer).start()
    atexit.register(lambda: print("atexit ran", file=sys.stderr))
    print("x" * 200_000)
    print("to stderr", file=sys.stderr)
    {end}

if {run_command}:
    run_command(main)
else:
    sys.exit(main())
'''

ENDS = {
    "returns 0": "return 0",
    "returns None": "return None",
    "returns 3": "return 3",
    "SystemExit(2)": "raise SystemExit(2)",
    "SystemExit with a message": "raise SystemExit('minilora.x: error: a message')",
    "an uncaught error": "raise RuntimeError('boom')",
}


def run(end: str, with_run_command: bool) -> tuple[int, str, str]:
    """The exit code, stdout and stderr, the traceback's frame lines left out (run_command adds one)."""
    script = SCRIPT.format(end=end, run_command=with_run_command)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a pipe is by default
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    return r.returncode, r.stdout, "".join(line for line in r.stderr.splitlines(True) if not line.startswith("  "))


@pytest.mark.parametrize("end", ENDS.values(), ids=ENDS.keys())
def test_run_command_exits_as_python_does(end):
    plain = run(end, False)
    assert run(end, True) == plain
    assert plain[1].endswith("thread done\n") and plain[2].endswith("atexit ran\n")  # the reference is as meant


def test_every_command_exits_through_run_command():
    """Each `if __name__ == "__main__":` block of the package ends in run_command(main)."""
    blocks = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
                blocks[path.relative_to(PACKAGE).as_posix()] = ast.unparse(node.body[-1])
    assert set(blocks) >= {"train.py", "generate.py", "merge.py", "export/merge.py"}
    assert all(last == "run_command(main)" for last in blocks.values()), blocks


def test_minilora_warnings_print_as_one_line_of_words(tmp_path):
    """Under run_command a warning of minilora's prints as `minilora: warning: ...`, without Python's file, line and
    source line; another package's still prints as Python prints it."""
    script = (
        "import warnings\n"
        "from minilora import run_command\n"
        "from minilora.export import merge\n"
        "def main():\n"
        "    warnings.warn_explicit(merge.MERGED_4BIT_WARNING, UserWarning, merge.__file__, 212)\n"  # from merge.py
        "    warnings.warn('from elsewhere', UserWarning)\n"
        "    return 0\n"
        "run_command(main)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    from minilora.export.merge import MERGED_4BIT_WARNING

    assert r.returncode == 0
    assert f"minilora: warning: {MERGED_4BIT_WARNING}\n" in r.stderr and "UserWarning: --save-method" not in r.stderr
    assert "<string>:6: UserWarning: from elsewhere" in r.stderr

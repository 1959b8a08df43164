"""Run a stage's main() as its command line does (through plumbing.run_cli) and return what a user sees."""
import subprocess
import sys
from pathlib import Path

import pytest

import plumbing

ROOT = Path(__file__).resolve().parents[1]


def cli_error(main, argv, capsys):
    """(exit code, stderr) of `main(argv)` run through run_cli, in this process (no interpreter start)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        plumbing.run_cli(lambda: main(argv))
    return e.value.code, capsys.readouterr().err


def script_error(script, argv, cwd=ROOT):
    """(exit code, stderr) of the real script in a fresh interpreter."""
    r = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    return r.returncode, r.stderr


def assert_one_line(code, err, message):
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and message in err, err

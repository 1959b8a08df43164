"""Run a stage's main() as its command line does (through plumbing.run_cli) and return what a user sees."""
import contextlib
import importlib
import shlex
import subprocess
import sys
import time
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


def run_stages_here(monkeypatch, experiment):
    """Make `experiment` run each stage's main() in this process, not in a fresh interpreter (an interpreter
    start and the transformers import cost seconds a stage, the stage itself a fraction of one); the
    commands it ran, in order."""
    ran = []

    def run(cmd, log_path, what, cwd=None):
        print(f"  $ {shlex.join(cmd)}", flush=True)
        ran.append(cmd)
        stage = importlib.import_module(Path(cmd[1]).stem)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log_path, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print(f"$ {shlex.join(cmd)}", flush=True)
            try:
                stage.main(cmd[2:])
            except plumbing.DataError as e:
                raise plumbing.DataError(f"{what} failed: {e}") from None
        return time.time() - t0

    monkeypatch.setattr(experiment, "run_stage", run)
    monkeypatch.chdir(ROOT)
    return ran

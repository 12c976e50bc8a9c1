"""A benchmark's child process: run it, read the JSON it reports on one line."""

import json
import subprocess


def child_result(command: list[str], env: dict[str, str], prefix: str, failed: str) -> dict:
    """Run ``command`` with ``env``; the JSON after ``prefix`` on the last line that starts with it.
    Where the process fails or reports nothing: exit with ``failed`` and its output's last lines."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise SystemExit(f"{failed}:\n{tail}")
    return json.loads(lines[-1].removeprefix(prefix))

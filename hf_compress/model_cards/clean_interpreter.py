"""A Python interpreter where `import hf_compress` fails, for reading what we wrote as a user would.

The loaders check ([`hf_compress.model_cards.loading.check_loaders`]) must read a folder with plain transformers in a
process that never imported hf_compress, so nothing we register (a quantizer, a model class) can make a checkpoint
load that a user's process would not. Starting that process costs 5-11 s on a 2-core machine (torch and transformers
import before anything runs), and a process that checks many folders (a benchmark's variants, `--target latency`'s
candidates, a notebook, the test suite) paid it for each one.

`run_without_hf_compress` therefore forks each check from one warm clean interpreter per process: a `python -S`
child without hf_compress on its path that imported torch, transformers and safetensors and nothing of ours (the
same guard as every check runs refuses otherwise). Each check is a fresh `os.fork()` of that pristine parent, so no
check sees another's state; it runs in its own cwd with its own environment and stdout/stderr. The warm parent is
keyed by the environment variables its imports read (`HF_*`, `TRANSFORMERS_*`, `TORCH*`, `OMP_*`, ...): a check
under another value of one of them starts a new parent. Without `os.fork` (Windows), or if the warm parent cannot
start, each check starts its own cold interpreter, as `subprocess.run` would.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
import threading

RESULT_TENSORS = "result.safetensors"

_GUARD = ("try:\n    import hf_compress\nexcept ImportError:\n    pass\nelse:\n"
          "    raise SystemExit('hf_compress is importable in the clean interpreter')\n")

# The warm parent: imports what every check imports, then forks one child per request line on stdin and answers
# with the child's exit status on stdout. Requests name a script, a cwd, an environment, the files for the child's
# stdout and stderr, a timeout and transformers' own modules to import first (the checked model's modeling module,
# which a fresh interpreter's `from_pretrained` imports the same way). Nothing else is preloaded: a third-party
# package's import (compressed_tensors, onnxruntime) could change what a later check of another folder sees.
_SERVER = _GUARD + r'''
import json, os, signal, sys, time, traceback
import torch, transformers, safetensors.torch
from transformers import AutoConfig, AutoTokenizer, modeling_utils

def _child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdin = open(os.devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [req["script"]]
    code = 0
    try:
        with open(req["script"]) as f:
            source = f.read()
        exec(compile(source, req["script"], "exec"), {"__name__": "__main__", "__file__": req["script"],
                                                      "__builtins__": __builtins__})
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

out = sys.stdout
out.write("READY\n")
out.flush()
for line in sys.stdin:
    req = json.loads(line)
    for name in req.get("preload", ()):
        if not name.startswith("transformers.models."):
            continue
        try:
            __import__(name)
        except Exception:
            pass  # the child imports it itself and reports what fails
    out.flush()
    pid = os.fork()
    if pid == 0:
        _child(req)
    deadline = time.monotonic() + req["timeout"]
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
    out.flush()
'''

# Environment variables read at import time by torch, transformers, huggingface_hub or tokenizers: a warm parent
# started under other values would not be what a fresh interpreter is.
_IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "KMP_", "CUDA_",
                    "TOKENIZERS_", "SAFETENSORS_", "XDG_", "HOME", "PATH", "LD_", "PYTHON")


def python_without_hf_compress() -> list[str]:
    """A command prefix running Python with the installed packages but without hf_compress importable: no site
    processing (so no editable-install hook), site-packages appended by hand; run it with a `cwd` outside the repo."""
    import site
    import sys

    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    boot = "import sys; sys.path.extend(%r); sys.argv = sys.argv[1:]; exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'))" % paths
    return [sys.executable, "-S", "-c", boot]


def clean_env() -> dict:
    """The environment of a clean check: ours without the variables that put other code on the path, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


class WarmInterpreter:
    """One warm clean parent (`_SERVER` above) and the pipes to it; `run` forks a check from it."""

    def __init__(self, env: dict):
        self.key = import_time_env(env)
        self._home = tempfile.TemporaryDirectory(prefix="hf-compress-clean-")
        script = os.path.join(self._home.name, "warm_clean_interpreter.py")
        with open(script, "w") as f:
            f.write(_SERVER)
        self._proc = subprocess.Popen(python_without_hf_compress() + [script], cwd=self._home.name, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, bufsize=1)
        if self._proc.stdout.readline().strip() != "READY":
            self.close()
            raise RuntimeError("the warm clean interpreter did not start")

    def alive(self) -> bool:
        return self._proc.poll() is None

    def run(self, script: str, cwd: str, env: dict, timeout: float, preload=()) -> subprocess.CompletedProcess:
        out, err = os.path.join(self._home.name, "stdout"), os.path.join(self._home.name, "stderr")
        request = {"script": script, "cwd": cwd, "env": env, "stdout": out, "stderr": err, "timeout": timeout,
                   "preload": list(preload)}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the warm clean interpreter exited")
        answer = json.loads(line)
        with open(out) as f:
            stdout = f.read()
        with open(err) as f:
            stderr = f.read()
        args = python_without_hf_compress() + [script]
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(args, answer["returncode"], stdout, stderr)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._home.cleanup()


def import_time_env(env: dict) -> tuple:
    """The part of `env` a warm parent's imports already read ([`_IMPORT_TIME_ENV`])."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV)))


_warm: WarmInterpreter | None = None
_warm_failed = False  # a parent that could not start is not started again: each later check runs cold at once
_lock = threading.Lock()


def _warm_for(env: dict) -> WarmInterpreter | None:
    """The process' warm parent for `env` (started or restarted as needed), or None where forking is unavailable."""
    global _warm, _warm_failed
    if not hasattr(os, "fork") or _warm_failed:
        return None
    if _warm is not None and (_warm.key != import_time_env(env) or not _warm.alive()):
        _warm.close()
        _warm = None
    if _warm is None:
        try:
            _warm = WarmInterpreter(env)
        except (OSError, RuntimeError):
            _warm_failed = True
            return None
    return _warm


@atexit.register
def _close_warm() -> None:
    if _warm is not None:
        _warm.close()


def run_without_hf_compress(code: str, cwd: str, timeout: int = 300, preload=()) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where `import hf_compress` fails (checked first); returns the CompletedProcess.
    `preload`: transformers' own modules the code will import (`transformers.models.<family>.modeling_<family>`),
    imported once in the warm parent so later checks of the same family skip it; other names are not preloaded."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=cwd, delete=False) as f:
        f.write(_GUARD + code)
    env = clean_env()
    try:
        with _lock:
            warm = _warm_for(env)
            if warm is not None:
                try:
                    return warm.run(f.name, cwd, env, timeout, preload)
                except (OSError, RuntimeError, ValueError):
                    pass  # the warm parent died: this check runs cold, and the next one restarts it
        return subprocess.run(python_without_hf_compress() + [f.name], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        os.unlink(f.name)


def run_result_without_hf_compress(code: str, timeout: int = 300, preload=()) -> dict:
    """Run `code` in a fresh interpreter without hf_compress (a temporary cwd) and return the JSON it printed on its
    `RESULT ` line, or `{"error": <the last line of stderr>}` when it printed none. Tensors travel as a safetensors
    file the code writes in its cwd ([`RESULT_TENSORS`], named by `"tensors_file"` in the JSON): a causal LM's logits
    over a 49k-262k vocabulary as JSON text took minutes to print and parse; its entries join the returned dict."""
    with tempfile.TemporaryDirectory() as cwd:
        proc = run_without_hf_compress(code, cwd, timeout=timeout, preload=preload)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if not line:
            return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        result = json.loads(line[7:])
        name = result.pop("tensors_file", None)
        if name is not None:
            from safetensors.torch import load_file

            result.update(load_file(os.path.join(cwd, os.path.basename(name))))
        return result


def modeling_modules(config: dict) -> list[str]:
    """The transformers module a fresh `from_pretrained` of a folder with this `config.json` imports for its model
    type (`[]` when transformers has none, e.g. a remote-code model)."""
    import importlib.util

    model_type = str(config.get("model_type") or "").replace("-", "_")
    if not model_type:
        return []
    name = f"transformers.models.{model_type}.modeling_{model_type}"
    try:
        return [name] if importlib.util.find_spec(name) is not None else []
    except (ImportError, ValueError):
        return []

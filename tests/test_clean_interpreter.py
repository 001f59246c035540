"""The clean interpreter the loaders check reads folders in: forked from one warm parent without hf_compress, each
check as fresh as a new `python` (no state from the previous check, the environment it was given), with a cold
interpreter where forking is unavailable."""

import json
import os
import subprocess

import pytest

from hf_compress.model_cards import clean_interpreter
from hf_compress.model_cards.clean_interpreter import modeling_modules, run_without_hf_compress

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm parent forks; without fork checks run cold")


def _report(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])


PROBE = """
import json, os, sys, transformers, huggingface_hub.constants as c
seen = getattr(transformers, "_probe_mark", None)
transformers._probe_mark = os.getpid()
from transformers import AutoConfig, PretrainedConfig
class ProbeConfig(PretrainedConfig):
    model_type = "hf-compress-probe"
try:
    AutoConfig.register("hf-compress-probe", ProbeConfig)
    registered = "new"
except ValueError:
    registered = "already there"
print("RESULT", json.dumps({"seen": seen, "registered": registered, "pid": os.getpid(), "ppid": os.getppid(),
                            "cwd": os.getcwd(), "hf_home": c.HF_HOME, "offline": os.environ.get("HF_HUB_OFFLINE"),
                            "hf_compress": "hf_compress" in sys.modules}))
"""


def test_each_check_is_a_fresh_fork_of_one_warm_parent(tmp_path):
    first = _report(run_without_hf_compress(PROBE, str(tmp_path)))
    second = _report(run_without_hf_compress(PROBE, str(tmp_path)))
    # One warm parent (not this process) forks both: no import paid twice ...
    assert first["ppid"] == second["ppid"] != os.getpid()
    assert first["pid"] != second["pid"]
    # ... and nothing the first check did (a module attribute, a registered config class) is seen by the second.
    assert first["seen"] is None and second["seen"] is None
    assert first["registered"] == second["registered"] == "new"
    assert first["hf_compress"] is False
    assert first["cwd"] == os.path.realpath(tmp_path)
    assert first["offline"] == "1"


def test_another_import_time_environment_starts_another_parent(tmp_path, monkeypatch):
    before = _report(run_without_hf_compress(PROBE, str(tmp_path)))
    home = str(tmp_path / "other-hf-home")
    monkeypatch.setenv("HF_HOME", home)
    after = _report(run_without_hf_compress(PROBE, str(tmp_path)))
    # huggingface_hub reads HF_HOME when it is imported: the check under the new value sees it, from a new parent.
    assert after["hf_home"] == home != before["hf_home"]
    assert after["ppid"] != before["ppid"]


def test_exit_status_output_and_timeout_are_those_of_a_subprocess(tmp_path):
    proc = run_without_hf_compress("import sys\nprint('out')\nprint('err', file=sys.stderr)\nraise SystemExit(3)\n",
                                   str(tmp_path))
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    failed = run_without_hf_compress("1 / 0\n", str(tmp_path))
    assert failed.returncode == 1 and failed.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    refused = run_without_hf_compress("import hf_compress\n", str(tmp_path))
    assert refused.returncode == 1 and "No module named 'hf_compress'" in refused.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        run_without_hf_compress("import time\ntime.sleep(30)\n", str(tmp_path), timeout=1)
    # The parent outlives a killed check; the next check is forked from it again.
    assert run_without_hf_compress("print('again')\n", str(tmp_path)).stdout == "again\n"


def test_the_parent_preloads_only_transformers_modules(tmp_path):
    probe = "import sys, json\nprint('RESULT', json.dumps({m: m in sys.modules for m in ('json', 'wave', 'transformers.models.gpt2.modeling_gpt2')}))\n"
    seen = _report(run_without_hf_compress(probe, str(tmp_path), preload=["wave", "transformers.models.gpt2.modeling_gpt2"]))
    assert seen == {"json": True, "wave": False, "transformers.models.gpt2.modeling_gpt2": True}


def test_a_dead_parent_is_replaced_and_the_check_still_runs(tmp_path):
    first = _report(run_without_hf_compress(PROBE, str(tmp_path)))
    os.kill(first["ppid"], 9)
    clean_interpreter._warm._proc.wait()
    after = _report(run_without_hf_compress(PROBE, str(tmp_path)))
    assert after["ppid"] != first["ppid"] and after["seen"] is None


def test_modeling_modules_name_only_the_transformers_family_module_a_fresh_load_imports():
    assert modeling_modules({"model_type": "bert"}) == ["transformers.models.bert.modeling_bert"]
    # The quantization backend is not preloaded: a third-party import could change what a later check sees.
    assert modeling_modules({"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}}) == [
        "transformers.models.llama.modeling_llama"]
    assert modeling_modules({"model_type": "no-such-family"}) == []
    assert modeling_modules({}) == []

"""bench/gpu_check.py --quick: every check runs at toy size on the CPU and says which ones need CUDA."""
import json
import subprocess
import sys

from conftest import ROOT


def test_quick_runs_every_check_and_names_what_needs_cuda(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--json", str(tmp_path / "r.json"),
                        "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.load(open(tmp_path / "r.json"))
    checks = {c["check"]: c for c in report["checks"]}
    assert list(checks) == ["train", "trainer", "fp16", "resume", "attention", "lora", "infer", "decode", "ddp"]
    assert checks["fp16"]["status"] == "skipped" and "needs CUDA" in checks["fp16"]["note"]
    assert all(c["status"] == "ok" for name, c in checks.items() if name != "fp16"), r.stdout
    assert "CUDA" in checks["train"]["note"] and "bitsandbytes" in checks["lora"]["note"]
    assert checks["resume"]["measured"]["max_abs_weight_diff"] == 0.0
    assert checks["infer"]["measured"]["greedy_equal"] == "3/3"
    decode = checks["decode"]["measured"]
    assert decode["greedy_equal_compiled"] == "16/16" and decode["static_compiled_tok_s"] > 0 and decode["int8_tok_s"] > 0
    assert checks["trainer"]["measured"]["ratio"] > 0 and checks["train"]["measured"]["tokens_per_s"] > 0
    assert all(c["what"] and c["seconds"] > 0 for name, c in checks.items() if name != "fp16")
    assert report["device"] == "CPU" and report["quick"] is True

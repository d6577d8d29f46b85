"""The benchmark scripts at the tiny shape: they run, and their JSON has the fields the docs rely on."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name, *args, tmp_path):
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args, "--json", str(out),
                             "--markdown", str(tmp_path / "bench.md")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text()), (tmp_path / "bench.md").read_text(), result.stdout


def test_bench_generate_tiny(tmp_path):
    report, markdown, stdout = run_script("bench_generate.py", "--tiny", "--device", "cpu", tmp_path=tmp_path)
    assert set(report["policies"]) == {"rolling", "pyramid"}
    for policy in report["policies"].values():
        assert policy["chunks"] == 12
        assert policy["ms_per_chunk_steady"] > 0 and policy["dit_fps"] > 0
        assert 0 < policy["attention_share"] < 1 and 0 <= policy["plan_share"] < 1
    assert 0.4 < report["key_fraction"] < 0.5
    ideal = 1 / (1 - report["attention_share_rolling"] * (1 - report["key_fraction"]))
    assert abs(report["ideal_speedup"] - ideal) < 1e-9
    assert "pyramid / rolling" in stdout
    assert markdown.count("| tiny |") == 1 and "## bench_generate.py" in markdown


def test_bench_attention_tiny(tmp_path):
    report, markdown, _ = run_script("bench_attention.py", "--shape", "tiny", "--device", "cpu", "--repeat", "2",
                                     tmp_path=tmp_path)
    assert set(report["ms"]) == {"dense_sdpa", "rolling[split]", "pyramid[split]", "pyramid[sdpa]"}
    assert 0.4 < report["key_fraction"] < 0.5
    assert "## bench_attention.py" in markdown


def test_bench_profile_tiny(tmp_path):
    report, _, _ = run_script("bench_profile.py", "--shape", "tiny", "--device", "cpu", "--seconds", "3",
                              tmp_path=tmp_path)
    assert report["latent_frames"] == 12 and report["plain_s"] > 0 and report["capture_s"] > 0

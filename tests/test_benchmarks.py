"""The benchmark scripts keep working (their timings are figures to read, not assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_protocol_script_runs_small_on_the_cpu(tiny_clip_name, tmp_path):
    """benchmarks/gpu_protocol.py --small, with a small ResNet and a tiny CLIP instead of the
    paper's models (the same code path): every figure is reported and positive."""
    import open_clip

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    from conftest import TINY_CLIP_CONFIG

    (config_dir / f"{tiny_clip_name}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_protocol.py"), "--small", "--quiet",
                          "--models", "timm:resnet10t@layer3", "--clip", tiny_clip_name, "--clip-config", str(config_dir),
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["layer"] == "layer3" and result["n_images"] == 40 and result["protocol_images"] == 40
    for key in ("capture_images_per_s", "alignment_rows_per_s", "sae_vectors_per_s", "protocol_s"):
        assert result[key] > 0, key
    assert "| timm:resnet10t | layer3 |" in run.stdout
    del open_clip

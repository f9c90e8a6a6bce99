"""services/recommender/README.md: every bash block runs as written, the paths it promises appear
relative to the working directory, and every option of the train command is documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from services.recommender import train
from services.recommender.bundle import load_bundle
from services.runtime.model_store import ModelStore

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "services" / "recommender" / "README.md"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_every_option_of_the_train_command_is_documented() -> None:
    text = README.read_text(encoding="utf-8")
    options = [o for a in train.build_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert len(options) > 20
    missing = [o for o in options if o != "--help" and f"`{o}`" not in text]
    assert not missing, f"options not in the README: {missing}"


def test_the_bash_blocks_run_as_written_and_write_where_the_readme_says(tmp_path: Path) -> None:
    """In an empty folder, with no ``CBEC_*`` settings, the venv's ``python`` first on PATH."""
    blocks = bash_blocks()
    assert blocks and any("services.recommender.train" in b for b in blocks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBEC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OPENBLAS_NUM_THREADS="1", CBEC_DEVICE="cpu")
    outputs = []
    for block in blocks:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, f"{block}\n--- stderr:\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
        outputs.append(done.stdout)
    stdout = "\n".join(outputs)
    # the documented defaults: relative paths inside the working directory
    text = README.read_text(encoding="utf-8")
    documented = ("var/recommender/eval", "models/recommender", "var/recommender/embeddings.sqlite3")
    assert all(path in text for path in documented)
    assert (tmp_path / "var" / "recommender" / "eval" / "evaluation.json").is_file()
    assert (tmp_path / "var" / "recommender" / "eval" / "evaluation.png").is_file()
    assert (tmp_path / "var" / "recommender" / "eval" / "tuning.png").is_file()  # the budget's curve
    assert (tmp_path / "var" / "recommender" / "embeddings.sqlite3").is_file()
    assert (tmp_path / "var" / "recommender.sqlite3").is_file()  # --events store
    versions = ModelStore(tmp_path / "models", "recommender").versions()
    saved = re.findall(r"saved model version (\S+)", stdout)
    assert [v.version for v in versions] == saved[::-1] and all(v.valid for v in versions)
    # what the service loads at start: the newest valid version, here the retrained ALS
    newest = ModelStore(tmp_path / "models", "recommender").newest_valid()
    assert newest is not None and newest.version == saved[-1]
    assert newest.manifest is not None and newest.manifest.params["serving_model"] == "als"
    bundle = load_bundle(newest.path)
    assert len(bundle.users) > 2 and bundle.index is not None
    first = versions[-1]
    assert first.manifest is not None and first.manifest.metrics["ndcg@10"] > 0
    assert (first.path / "evaluation.json").is_file() and (first.path / "content.npy").is_file()

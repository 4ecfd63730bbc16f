"""The shell scripts a GPU session depends on (scripts/): they must parse, and the native-source
hash that decides whether a prebuilt ``_C`` may be used must follow the sources' bytes."""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.mark.parametrize("script", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "scripts", "*.sh"))))
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_native_hash_follows_the_native_sources(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    (tree / "scripts").mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "native_hash.sh"), tree / "scripts" / "native_hash.sh")

    def digest():
        r = subprocess.run(["bash", str(tree / "scripts" / "native_hash.sh")], capture_output=True, text=True, check=True)
        return r.stdout.strip()

    here = subprocess.run(["bash", os.path.join(ROOT, "scripts", "native_hash.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()
    first = digest()
    assert len(first) == 32 and first == here  # same bytes, another folder: same hash
    (tree / "csrc" / "notes.txt").write_text("not a source")
    assert digest() == first  # only what the compiler reads counts
    cu = next((tree / "csrc").rglob("*.cu"))
    cu.write_text(cu.read_text() + "\n// edited\n")
    edited = digest()
    assert edited != first
    (tree / "setup.py").write_text((tree / "setup.py").read_text() + "\n# edited\n")
    assert digest() != edited

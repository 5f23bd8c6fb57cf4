"""Run TRL v0.15.2's own ORPO tests against alignkit_orpo, offline.

1. Downloads TRL v0.15.2's source distribution from the package registry (`pip download --no-deps
   --no-binary :all: trl==0.15.2`) and takes tests/test_orpo_trainer.py from it (never committed here).
2. Changes only the two `from trl ...` import lines (to `from alignkit_orpo import ...`) and the three
   Hub fixture ids (to local folders); every test and assertion is kept as written.
3. Builds the offline stand-ins for those fixtures (benchmarks/trl_standins.py: tiny Qwen2 and T5 models
   with tokenizers built here, the `zen` preference configs) and runs the file with pytest.

    python benchmarks/run_trl_orpo_tests.py [--keep DIR] [--against trl] [-- PYTEST_ARGS]

`--against trl` leaves the imports alone (run it with a TRL 0.15.2 environment's python, to see the
stand-ins pass there too). Exit status: pytest's. Results: benchmarks/trl-parity.md.
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_VERSION = "0.15.2"
TEST_FILE = "tests/test_orpo_trainer.py"
IMPORTS = {
    "from trl import ORPOConfig, ORPOTrainer\n": "from alignkit_orpo import ORPOConfig, ORPOTrainer\n",
    "from trl.trainer.utils import SIMPLE_CHAT_TEMPLATE\n": "from alignkit_orpo import SIMPLE_CHAT_TEMPLATE\n",
}
FIXTURES = {  # Hub id -> stand-in folder name
    "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": "qwen2",
    "trl-internal-testing/tiny-T5ForConditionalGeneration": "t5",
    "trl-internal-testing/zen": "zen",
}


def download_test_file(work: Path) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"trl=={TRL_VERSION}", "-d", str(work)], check=True)
    (sdist,) = work.glob(f"trl-{TRL_VERSION}.tar.gz")
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"trl-{TRL_VERSION}/{TEST_FILE}")
        return member.read().decode()


def substitute(text: str, standins: dict[str, Path], imports: bool = True) -> str:
    """Exactly the import lines and the fixture ids; each must occur, or TRL's file is not the one expected."""
    swaps = {**(IMPORTS if imports else {}), **{hub: str(standins[name]) for hub, name in FIXTURES.items()}}
    for old, new in swaps.items():
        if old not in text:
            raise SystemExit(f"{TEST_FILE} of TRL {TRL_VERSION} has no {old.strip()!r}; nothing was run")
        text = text.replace(old, new)
    return text


def main() -> int:
    try:
        import parameterized  # noqa: F401  (TRL's test file imports it)
    except ImportError:
        raise SystemExit("TRL's test file needs `parameterized`: pip install -e \".[bench]\"") from None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--against", choices=["alignkit", "trl"], default="alignkit")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from trl_standins import build_all

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        test = substitute(download_test_file(work), build_all(work / "fixtures"), imports=args.against == "alignkit")
        path = work / "test_orpo_trainer.py"
        path.write_text(test)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", str(path),
               "--rootdir", str(work), *args.pytest_args]
        return subprocess.run(cmd, cwd=work, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())

"""README's "Use the kernels in your model" examples run as written, and its commands match .ci/run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


EXAMPLES = re.findall(r"```python\n(.*?)```", section("Use the kernels in your model"), flags=re.S)


def test_reuse_section_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_reuse_example_runs(code):
    if "diffusers" in code:
        pytest.importorskip("diffusers")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


def test_readme_opens_with_the_two_commands_ci_runs():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("python -m fastdiff.train")
    ci = (ROOT / ".ci" / "run").read_text()
    setup = re.search(r"^SETUP='(.*)'$", ci, flags=re.M).group(1)
    tests = re.search(r"^TESTS='(.*)'$", ci, flags=re.M).group(1)
    assert first_block[1] == f"{setup} && {tests}"
    assert first_block[0].startswith(setup)

"""The container image: built from what the lock file pins, with the package on top.

No docker engine runs here, so these read the Dockerfile as the builder would
(logical instructions, build arguments) and check what each stage installs.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def dockerfile_default(arg: str) -> str:
    match = re.search(rf"^ARG {arg}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no default for ARG {arg}"
    return match.group(1)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, continuations joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest))
            pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def test_dockerfile_instructions_are_all_known():
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "USER", "WORKDIR", "LABEL", "EXPOSE", "CMD", "ENTRYPOINT"}
    instructions = dockerfile_instructions()
    assert instructions and all(keyword in known for keyword, _ in instructions), instructions
    assert instructions[0][0] in ("ARG", "FROM")


def test_dockerfile_switches_cpu_and_cuda_with_one_build_argument():
    instructions = dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert dockerfile_default("VARIANT") == "cpu"
    assert any(re.match(r"rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-cpu AS base-cpu$", f) for f in froms)
    assert any(re.match(r"rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu AS base-gpu$", f) for f in froms)
    assert froms[-1].startswith("base-${VARIANT}")
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text


def test_dockerfile_installs_the_package_as_a_non_root_user():
    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    users = [args.strip() for keyword, args in final if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    copies = " ".join(args for keyword, args in final if keyword == "COPY")
    assert "pyproject.toml" in copies and "uflow_batch" in copies
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert re.search(r"pip install [^&]*/tmp/uflow-batch", runs)
    assert "uflow-batch --help" in runs  # the console script exists in the image


def test_docker_build_context_leaves_the_virtualenv_out():
    lines = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert patterns[0] == "*"  # everything out, then only what the image needs back in
    assert {"!pyproject.toml", "!README.md", "!uflow_batch", "!jobs"} <= set(patterns)

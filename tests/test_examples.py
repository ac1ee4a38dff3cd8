"""Every example in examples/ runs (shortened) and leaves a valid PEFT adapter where it says it did; the README
shows every public name."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hub
import lightning_lora
from lightning_lora import validate_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUNS = {
    "quickstart": ["quickstart.py", "--max-steps", "3", "--out", "out"],
    "causal_lm": ["causal_lm.py", "--max-steps", "3", "--out", "out"],
    "ddp": ["ddp.py", "--max-steps", "2", "--out", "out"],
    "lightning_cli": ["lightning_cli.py", "fit", "--config", str(EXAMPLES / "config.yaml"), "--trainer.max_steps", "2"],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """All examples at once, each in its own folder (their imports dominate the time)."""
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
    procs = {}
    for name, args in RUNS.items():
        cwd = tmp_path_factory.mktemp(name)
        procs[name] = cwd, subprocess.Popen([sys.executable, str(EXAMPLES / args[0]), *args[1:]], cwd=cwd, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, (cwd, proc) in procs.items():
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
        results[name] = cwd, subprocess.CompletedProcess(proc.args, proc.returncode, out)
    return results


def printed_adapter(result: subprocess.CompletedProcess) -> Path:
    assert result.returncode == 0, result.stdout[-3000:]
    match = re.search(r"(/\S+/adapter/last)\s*$", result.stdout, re.MULTILINE)
    assert match, result.stdout[-2000:]
    return Path(match.group(1))


@pytest.mark.parametrize("name", ["quickstart", "causal_lm", "ddp"])
def test_example_writes_the_adapter_it_prints(outputs, name):
    cwd, result = outputs[name]
    path = printed_adapter(result)
    assert path == cwd / "out" / "adapter" / "last"
    assert validate_adapter(path).num_params > 0


def test_causal_lm_shows_generations(outputs):
    _, result = outputs["causal_lm"]
    assert re.search(r"^before: '.+'$", result.stdout, re.MULTILINE)
    assert re.search(r"^after:  '.+'$", result.stdout, re.MULTILINE)
    info = validate_adapter(printed_adapter(result))
    # all-linear is written as the matched paths: every linear layer of each block, not the output head
    assert {t.rsplit(".", 1)[-1] for t in info.config.target_modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(t.startswith("model.layers.") for t in info.config.target_modules)


def test_ddp_example_used_two_processes(outputs):
    assert "2 processes trained one adapter" in outputs["ddp"][1].stdout


def test_lightning_cli_example(outputs):
    cwd, result = outputs["lightning_cli"]
    assert result.returncode == 0, result.stdout[-3000:]
    info = validate_adapter(cwd / "runs" / "cli" / "adapter" / "last")
    assert info.config.r == 8 and set(info.config.target_modules) == {"c_attn", "c_proj"}


@pytest.mark.parametrize("package", [lightning_lora, hub], ids=["lightning_lora", "hub"])
def test_readme_shows_every_public_name(package):
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = "\n".join(re.findall(r"```.*?```|`[^`\n]+`", readme, flags=re.DOTALL))  # code blocks and inline code
    unshown = [name for name in package.__all__ if not re.search(rf"\b{re.escape(name)}\b", code)]
    assert not unshown, f"README.md shows no {unshown} of {package.__name__}.__all__"


def runtime_imports(package: Path) -> set[str]:
    """Top-level names of the modules `package` imports, outside ``if TYPE_CHECKING:`` blocks."""
    names = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_runtime_import_is_a_declared_dependency():
    """An import served only by another package's dependencies breaks when that package changes them
    (huggingface_hub 1.x brings httpx, not the httpx2 that hub/api.py imports)."""
    text = (EXAMPLES.parent / "pyproject.toml").read_text()
    section = text[text.index("dependencies = ["):text.index("[project.scripts]")]  # and optional-dependencies
    requirements = re.findall(r'"([A-Za-z0-9][A-Za-z0-9._-]*)[^"]*"', section)
    declared = {re.sub(r"[-_.]+", "-", r).lower() for r in requirements}
    own = {"lightning_lora", "hub"}
    imported = set().union(*(runtime_imports(EXAMPLES.parent / p) for p in own)) - own - set(sys.stdlib_module_names)
    providers = importlib.metadata.packages_distributions()
    undeclared = {name: providers.get(name) for name in imported
                  if not {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(name, [name])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"

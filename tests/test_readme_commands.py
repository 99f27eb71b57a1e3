"""Every command the README and the launch scripts show parses with the scripts' real argument parsers.

The README's pipeline commands are also run in tiny form by the other tests and by `make demo`; this
test keeps their flags from drifting away from the code.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"captioner.py", "finetune_autoencoder.py", "build_model.py", "train.py", "test.py",
           "utils/prepare_coco_ad.py", "bench/bench_inference.py", "bench/bench_training.py", "bench/bench_eval.py",
           "bench/bench_report.py"}
MODULES = {"-m vlmdiff.report": "vlmdiff.report", "-m vlmdiff.metrics": "vlmdiff.metrics"}


def _logical_lines(text: str) -> list[str]:
    """Code lines of the ```bash blocks (README) or of a shell script, continuations joined."""
    lines, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append((buf + line).strip())
        buf = ""
    return lines


def _bash_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", markdown, flags=re.S))


def commands() -> list[tuple[str, str, list[str]]]:
    """(source, target, argv) for each python invocation found."""
    sources = {"README.md": _bash_blocks((ROOT / "README.md").read_text())}
    for p in sorted((ROOT / "scripts").glob("*.s*")):
        sources[f"scripts/{p.name}"] = p.read_text()
    found = []
    for source, text in sources.items():
        for line in _logical_lines(text):
            line = line.split("#", 1)[0].strip().replace("$p", "0").replace('"$DATA"', "data/x").replace('"$CKPT"', "c.ckpt")
            line = line.replace('"$START"', "s.ckpt").replace('"$NGPU"', "2")
            m = re.search(r"(?:python|torchrun[^\n]*?\d+)\s+(-m \S+|\S+\.py)\s*(.*)$", line)
            if not m or "pytest" in line or '"$@"' in line:  # "$@": the caller's arguments
                continue
            target, rest = m.group(1), m.group(2)
            rest = rest.split(";")[0].split("&&")[0]
            found.append((source, target, shlex.split(rest)))
    return found


def test_the_readme_shows_every_stage_for_every_dataset():
    cmds = [(t, a) for s, t, a in commands() if s == "README.md"]
    for script in ("captioner.py", "finetune_autoencoder.py", "build_model.py", "train.py", "test.py"):
        for dataset in ("mvtec", "visa", "realiad", "coco"):
            shown = [a for t, a in cmds if t == script and ("--data_set" not in a or a[a.index("--data_set") + 1] == dataset)]
            named = [a for a in shown if dataset in " ".join(a)]
            assert named, f"README shows no {script} command for {dataset}"
    assert any(t == "utils/prepare_coco_ad.py" for t, _ in cmds)


@pytest.mark.parametrize("source,target,argv", commands(),
                         ids=[f"{s}: {t} {' '.join(a[:4])}" for s, t, a in commands()])
def test_command_parses(source, target, argv, monkeypatch):
    if target in MODULES:
        module = importlib.import_module(MODULES[target])
    else:
        assert target in SCRIPTS, f"{source}: unknown script {target}"
        module = importlib.import_module(target[:-3].replace("/", "."))
    try:
        module.parse_args(argv)
    except SystemExit as e:  # argparse rejected a flag or value
        pytest.fail(f"{source}: `{target} {' '.join(argv)}` does not parse (exit {e.code})")

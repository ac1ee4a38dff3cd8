"""The README's main job (`make demo`), shortened: a real pretrained MiniLM, LoRA vs full fine-tuning, then
push / pull / reload / merge through a local lora-hub server."""

import importlib.util
import json
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_learns_and_shares_the_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    out = tmp_path / "demo"
    figures = _demo().main(["--fast", "--out", str(out), "--train-size", "384", "--val-size", "128",
                            "--epochs", "1", "--max-steps", "12"])

    assert figures["lora"] >= 0.75 > figures["untuned"] + 0.1, figures   # well above chance, and above untuned
    assert figures["pulled"] == figures["merged"] == figures["trained"] == figures["lora"]
    assert figures["ckpt_ratio"] < 0.01   # adapter-only checkpoint vs the full fine-tune's

    config = json.loads((out / "pulled" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    with safe_open(out / "pulled" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert all("lora_" in k or "classifier" in k for k in keys)
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()

"""LoRACallback given by `class_path` in a LightningCLI YAML config, its fields as `init_args`."""

from __future__ import annotations

import textwrap

import torch
from lightning.pytorch.cli import LightningCLI
from lit_models import CausalLM

from lightning_lora import LoRACallback, lora_layers, validate_adapter


def test_callback_from_yaml_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: 2
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: lightning_lora.LoRACallback
              init_args:
                r: 4
                alpha: 8
                target_modules: [c_attn, c_fc]
                bias: lora_only
                rank_pattern: {{c_fc: 2}}
                model_attr: model
                adapter_dir: {tmp_path / "adapter"}
        model:
          n_embd: 32
    """))
    cli = LightningCLI(CausalLM, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True})
    [callback] = [cb for cb in cli.trainer.callbacks if isinstance(cb, LoRACallback)]
    assert (callback.config.r, callback.config.alpha, callback.config.bias) == (4, 8.0, "lora_only")
    assert callback.config.rank_pattern == {"c_fc": 2}
    layers = dict(lora_layers(cli.model.model))
    assert sorted(p.rsplit(".", 1)[-1] for p in layers) == ["c_attn", "c_attn", "c_fc", "c_fc"]
    assert layers["transformer.h.0.mlp.c_fc"].lora_a["default"].shape[0] == 2
    assert all(b.abs().sum() > 0 for layer in layers.values() for b in layer.lora_b.values())
    info = validate_adapter(tmp_path / "adapter" / "last")
    assert info.config.r == 4 and info.config.rank_pattern == {"c_fc": 2} and info.config.bias == "lora_only"
    assert any(k.endswith(("c_attn.base_layer.bias", "c_attn.bias")) for k in info.shapes)
    checkpoint = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=True)
    assert all("lora_" in k or k.endswith(".bias") for k in checkpoint["state_dict"])

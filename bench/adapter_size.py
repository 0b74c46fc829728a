"""How far each run's final adapter moves the model: ||scale * B @ A||_F over its LoRA modules.

    python bench/adapter_size.py runs/sst2-fedsoda runs/sst2-central runs/sst2-fedsoda-dir05-fedavgm ...

Reads federate/adapter/ (for `local`, client 0's adapter) and prints one markdown row per run with
its plugin and sub accuracy from eval/results.json, so the size of the update can be read beside how
well it transfers from the client model to the full LLM.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def update_norm(adapter: Path) -> tuple[float, int]:
    """sqrt(sum over LoRA modules of ||(alpha / r) B @ A||_F^2), and the number of modules."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter / "adapter_model.safetensors")
    total, modules = 0.0, 0
    for name, a in weights.items():
        if "lora_A" in name:
            b = weights[name.replace("lora_A", "lora_B")]
            total += float(torch.linalg.matrix_norm(scale * b.double() @ a.double())) ** 2
            modules += 1
    return total**0.5, modules


def main(folders: list[str]) -> None:
    print("| run | LoRA modules | update norm | plugin | sub |")
    print("|---|---:|---:|---:|---:|")
    for folder in map(Path, folders):
        adapter = folder / "federate" / "adapter"
        if not adapter.is_dir():
            adapter = folder / "federate" / "clients" / "client-0" / "adapter"
        norm, modules = update_norm(adapter)
        results = json.loads((folder / "eval" / "results.json").read_text())
        acc = {t: f"{100 * results[t]['accuracy']:.1f}" if t in results else "-" for t in ("plugin", "sub")}
        print(f"| {folder.name} | {modules} | {norm:.2f} | {acc['plugin']} | {acc['sub']} |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""fedsoda: federated fine-tuning of LLMs with FedSODA (similarity group pruning + ODA + QLoRA)."""

__version__ = "0.1.0"

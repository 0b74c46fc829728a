"""Where the pooled hidden NMSE comes from: the first token's share of the residual stream's norm.

    python bench/hidden_nmse_tokens.py            # SmolLM2, 4 held-out WikiText-2 test windows of 128 tokens

For each pruning (the quickstart's 12-15 and the headline's 10-18), the output of the first kept
layer after the gap is compared with the full model's at the same original depth, as ODA's hidden
term does (`align.hidden_at = "output"`), without any alignment: pooled NMSE (`align.hidden_norm =
"pooled"`), the same without token 0, the mean per-token NMSE (`"token"`; both as the loss computes
them, `oda.distill.hidden_error`), token 0's share of the pooled squared norm, and the mean cosine of
tokens 1.. . Needs $FEDSODA_DATA (or ../shared/data).
"""

from __future__ import annotations

import argparse
import copy

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fedsoda_cli.data.public import public_windows
    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.oda.distill import hidden_error
    from fedsoda_cli.spec import Spec

    spec = Spec.model_validate(
        {"model": {"name": args.model}, "public_data": {"heldout_sequences": args.windows, "seq_len": args.seq_len}}
    )
    teacher, tokenizer = load_causal_lm(spec.model)
    teacher.eval()
    ids = public_windows(spec, "held-out", tokenizer)
    print(
        "| removed | pooled NMSE | NMSE without token 0 | mean per-token NMSE | token 0's share of the squared norm | mean cosine, tokens 1.. |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for removed in ([12, 13, 14, 15], list(range(10, 19))):
        student = copy.deepcopy(teacher)
        kept = drop_layers(student, removed)
        k = next(i for i, layer in enumerate(kept) if layer > max(removed))
        with torch.no_grad():
            ht = teacher(ids, output_hidden_states=True).hidden_states[kept[k] + 1]
            hs = student(ids, output_hidden_states=True).hidden_states[k + 1]
        pooled, token = (hidden_error(ht.flatten(0, 1), hs.flatten(0, 1), mode) for mode in ("pooled", "token"))
        err, norm = ((ht - hs) ** 2).sum(-1), (ht**2).sum(-1)  # per token: for the token-0 columns
        cosine = torch.nn.functional.cosine_similarity(ht[:, 1:], hs[:, 1:], dim=-1).mean()
        print(
            f"| {removed[0]}-{removed[-1]} | {pooled[0] / pooled[1]:.4f} | {err[:, 1:].sum() / norm[:, 1:].sum():.3f} | "
            f"{token[0] / token[1]:.3f} | {100 * norm[:, 0].sum() / norm.sum():.1f} % | {cosine:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Realigned layers as a delta: applying it to the held version gives the new artifact bit for bit,
only changed chunks travel, and a delta made against another base is refused."""

from __future__ import annotations

import pytest
import torch

from fedsoda_cli.federated.layer_delta import CHUNK, apply_delta, make_delta


def artifact(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "l.0.q.weight": torch.randint(0, 256, (1000, 1), dtype=torch.uint8, generator=g),  # odd chunk tail
        "l.0.q.weight.absmax": torch.randint(0, 256, (31,), dtype=torch.uint8, generator=g),
        "l.0.q.weight.nested_absmax": torch.rand(2, generator=g),
        "l.0.norm.weight": torch.rand(48, generator=g).to(torch.bfloat16),
    }


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(
            a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
            b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k],
        )
        for k in a
    )


@pytest.mark.parametrize("where", [[0], [999], [0, 500, 999], list(range(0, 1000, 7))])
def test_applying_the_delta_gives_the_new_artifact_bit_for_bit(where):
    base = artifact()
    new = {k: v.clone() for k, v in base.items()}
    for i in where:
        new["l.0.q.weight"][i, 0] ^= 1
    new["l.0.q.weight.nested_absmax"][1] += 0.5
    delta = make_delta(base, new)
    rebuilt = {**base, **apply_delta(base, delta)}
    assert same(rebuilt, new)
    from safetensors.torch import load

    travelled = {k.rsplit(".", 1)[0] for k in load(delta)}
    assert travelled == {"l.0.q.weight", "l.0.q.weight.nested_absmax"}  # unchanged tensors do not travel


def test_few_changed_blocks_cost_few_bytes():
    from safetensors.torch import load, save

    base = {"w": torch.randint(0, 256, (64 * 1024,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))}
    new = {"w": base["w"].clone()}
    new["w"][:: 64 * 1024 // 20] ^= 3  # 20 of 2048 chunks
    delta = make_delta(base, new)
    assert len(delta) < 20 * CHUNK + 2048 // 8 + 600  # changed chunks + bitmap + header
    assert len(delta) < len(save(new)) / 20
    assert not load(make_delta(base, base)) and same(apply_delta(base, make_delta(base, base)), base)


def test_a_delta_against_another_base_is_refused():
    base, other = artifact(0), artifact(1)
    new = {k: v.clone() for k, v in base.items()}
    new["l.0.q.weight"][3, 0] ^= 1
    with pytest.raises(ValueError, match="another version"):
        apply_delta(other, make_delta(base, new))


def test_new_keys_travel_whole():
    new = artifact(2)
    rebuilt = apply_delta({}, make_delta({}, new))
    assert same(rebuilt, new)

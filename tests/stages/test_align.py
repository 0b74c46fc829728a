"""ODA alignment: the loss (KL in chunks + hidden-state error at the gaps), partial-layer training,
and the align stage, on the tiny random llama (and one short real-SmolLM2 run)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fedsoda_cli.errors import SpecError
from fedsoda_cli.models.layers import drop_layers
from fedsoda_cli.models.load import load_causal_lm, load_checkpoint, save_checkpoint
from fedsoda_cli.oda import distill
from fedsoda_cli.spec.schema import AlignSpec, ModelSpec

GROUPS = [[2], [4]]  # of the tiny model's 6 layers: kept = [0, 1, 3, 5]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_teacher():
    return load_causal_lm(ModelSpec(name="tiny-random-llama"))


def pruned(teacher, groups=GROUPS):
    """(student, kept): a deep copy of `teacher` without the layers of `groups`."""
    student = copy.deepcopy(teacher)
    kept = drop_layers(student, [layer for g in groups for layer in g])
    return student, kept


def token_windows(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 49152, (n, length), generator=torch.Generator().manual_seed(seed))


# ---- where to align ------------------------------------------------------------------------------


def test_gaps_compare_the_input_of_the_first_kept_layer_after_each_group():
    plan = distill.gaps([0, 1, 3, 5], GROUPS, 6)
    assert [(g.removed, g.teacher_boundary, g.student_boundary) for g in plan] == [((2,), 3, 2), ((4,), 5, 3)]


def test_gap_at_the_end_compares_the_final_output_before_the_norm():
    plan = distill.gaps([0, 1, 2, 3, 4], [[5]], 6)
    assert [(g.teacher_boundary, g.student_boundary) for g in plan] == [(6, 5)]


def test_touching_groups_share_one_alignment_point():
    plan = distill.gaps([0, 1, 5], [[2, 3], [4]], 6)
    assert [(g.removed, g.teacher_boundary, g.student_boundary) for g in plan] == [((2, 3, 4), 5, 2)]


@pytest.mark.parametrize(
    "partial, expected",
    [
        ("after_gap", [2, 3]),
        ("both_neighbours", [1, 2, 3]),
        ("all_kept", [0, 1, 2, 3]),
        ([1, 5], [1, 3]),
    ],
)
def test_partial_layers_options(partial, expected):
    assert distill.partial_layers(partial, [0, 1, 3, 5], GROUPS) == expected


def test_partial_list_with_a_removed_layer_names_the_key():
    with pytest.raises(SpecError, match=r"align\.partial.*\[2\]"):
        distill.partial_layers([1, 2], [0, 1, 3, 5], GROUPS)


def test_output_points_compare_every_trained_layers_output_at_the_same_original_depth():
    plan = distill.loss_points([0, 1, 3, 5], GROUPS, 6, [1, 2, 3], "output")
    assert [(p.label, p.teacher_boundary, p.student_boundary) for p in plan] == [("out1", 2, 2), ("out3", 4, 3), ("out5", 6, 4)]
    assert distill.loss_points([0, 1, 3, 5], GROUPS, 6, [2, 3], "gap") == distill.gaps([0, 1, 3, 5], GROUPS, 6)


def test_gap_measuring_points_follow_hidden_at():
    output = distill.gap_points([0, 1, 3, 5], GROUPS, 6, "output")
    assert [(g.label, g.teacher_boundary, g.student_boundary) for g in output] == [("2", 4, 3), ("4", 6, 4)]
    assert distill.gap_points([0, 1, 3, 5], GROUPS, 6, "gap") == distill.gaps([0, 1, 3, 5], GROUPS, 6)


def test_a_loss_that_cannot_train_is_a_spec_error_not_a_traceback(tiny_teacher):
    teacher, _ = tiny_teacher
    student, kept = pruned(teacher, [[2]])
    config = AlignSpec(alpha=0.0, beta=1.0, hidden_at="gap")
    with pytest.raises(SpecError, match=r"hidden_at"):
        distill.align_partial_layers(
            teacher, student, kept, [[2]], "after_gap", distill.seeded_batches(token_windows(2, 8, 4), 2, 0), config, steps=1
        )


# ---- the loss ------------------------------------------------------------------------------------


def test_kl_and_hidden_error_are_zero_for_an_identical_student(tiny_teacher):
    teacher, _ = tiny_teacher
    student = copy.deepcopy(teacher)
    plan = [distill.Gap((2,), 3, 3), distill.Gap((5,), 6, 6)]  # any boundary: both models agree everywhere
    with torch.no_grad():
        parts = distill.oda_loss(teacher, student, {"input_ids": token_windows(2, 16, 0)}, plan, AlignSpec(logit_chunk=7))
    assert parts.kl_sum == 0.0
    assert parts.hidden_err == [0.0, 0.0]
    assert float(parts.loss) == 0.0
    assert all(n > 0 for n in parts.hidden_norm)


def test_kl_and_hidden_error_are_positive_for_a_pruned_student(tiny_teacher):
    teacher, _ = tiny_teacher
    student, kept = pruned(teacher)
    result = distill.evaluate_alignment(teacher, student, kept, GROUPS, token_windows(3, 16, 1), AlignSpec(logit_chunk=10))
    assert result["kl"] > 0
    assert set(result["hidden_nmse"]) == {"2", "4"}
    assert all(v > 0 for v in result["hidden_nmse"].values())
    assert result["ppl_student"] > 1 and result["ppl_teacher"] > 1


def test_token_nmse_counts_every_token_once_where_the_pooled_one_sees_only_the_largest():
    from fedsoda_cli.oda.distill import hidden_error

    torch.manual_seed(0)
    teacher = torch.randn(5, 8)
    teacher[0] *= 100  # an attention-sink-like token with a massive norm, reproduced exactly
    student = teacher.clone()
    student[1:] = torch.randn(4, 8)  # every other token is wrong
    e, n = hidden_error(teacher, student, "pooled")
    assert float(e / n) < 1e-3  # pooled: the sink's norm hides the other tokens' error
    e, n = hidden_error(teacher, student, "token")
    per_token = ((teacher - student).pow(2).sum(-1) / teacher.pow(2).sum(-1)).mean()
    assert float(n) == 5 and float(e / n) == pytest.approx(float(per_token)) and float(e / n) > 1
    # sums pool over batches: two halves give the numbers of the whole
    halves = [hidden_error(teacher[i:j], student[i:j], "token") for i, j in ((0, 2), (2, 5))]
    assert float(sum(h[0] for h in halves) / sum(h[1] for h in halves)) == pytest.approx(float(e / n))


def test_padding_is_ignored(tiny_teacher):
    teacher, _ = tiny_teacher
    student, kept = pruned(teacher)
    plan = distill.gaps(kept, GROUPS, 6)
    ids = token_windows(1, 12, 2)
    padded = torch.cat([ids, torch.full((1, 4), 2)], dim=1)  # right padding
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        plain = distill.oda_loss(teacher, student, {"input_ids": ids}, plan, AlignSpec())
        with_pad = distill.oda_loss(teacher, student, {"input_ids": padded, "attention_mask": mask}, plan, AlignSpec())
    assert with_pad.tokens == plain.tokens == 12
    assert with_pad.kl_sum == pytest.approx(plain.kl_sum, rel=1e-4)
    assert with_pad.hidden_err == pytest.approx(plain.hidden_err, rel=1e-4)


def test_chunked_kl_equals_the_unchunked_reference_in_value_and_gradient():
    torch.manual_seed(0)
    vocab, hidden, n, tau = 50, 8, 13, 2.0
    s_head, t_head = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    t_hidden = torch.randn(n, hidden)
    labels = torch.randint(0, vocab, (n,))
    labels[3] = distill.IGNORE

    s1 = torch.randn(n, hidden, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    kl, ce, _ = distill.logit_terms(s1, t_hidden, labels, s_head, t_head, tau, chunk=4)  # 4+4+4+1 tokens
    (kl + 0.5 * ce).backward()

    p_t = torch.softmax(t_head(t_hidden) / tau, dim=-1)
    log_p_s = torch.log_softmax(s_head(s2) / tau, dim=-1)
    ref_kl = (p_t * (p_t.log() - log_p_s)).sum()
    ref_ce = torch.nn.functional.cross_entropy(s_head(s2), labels, ignore_index=distill.IGNORE, reduction="sum")
    (ref_kl + 0.5 * ref_ce).backward()

    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", ["after_gap", "both_neighbours", "all_kept", [1]])
def test_only_the_partial_layers_change(tiny_teacher, partial):
    teacher, _ = tiny_teacher
    student, kept = pruned(teacher)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = AlignSpec(lr=1e-2, logit_chunk=16)
    batches = distill.seeded_batches(token_windows(4, 12, 3), 2, seed=0)
    distill.align_partial_layers(teacher, student, kept, GROUPS, partial, batches, config, steps=2)

    trained = {f"model.layers.{k}." for k in distill.partial_layers(partial, kept, GROUPS)}
    after = student.state_dict()
    for key, value in before.items():
        if any(key.startswith(prefix) for prefix in trained):
            assert not torch.equal(value, after[key]), f"{key} should have trained"
        else:
            assert torch.equal(value, after[key]), f"{key} should be untouched"
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_sgd_trains_too(tiny_teacher):
    teacher, _ = tiny_teacher
    student, kept = pruned(teacher)
    before = student.model.layers[2].mlp.down_proj.weight.clone()
    config = AlignSpec(optimizer="sgd", lr=1.0)
    distill.align_partial_layers(
        teacher, student, kept, GROUPS, "after_gap", distill.seeded_batches(token_windows(2, 8, 4), 2, 0), config, steps=1
    )
    assert not torch.equal(before, student.model.layers[2].mlp.down_proj.weight)


def test_alignment_lowers_the_loss(tiny_teacher):
    teacher, _ = tiny_teacher
    student, kept = pruned(teacher)
    fixed = {"input_ids": token_windows(4, 16, 5)}
    plan = distill.gaps(kept, GROUPS, 6)
    config = AlignSpec(lr=3e-3, logit_chunk=32)
    with torch.no_grad():
        start = float(distill.oda_loss(teacher, student, fixed, plan, config).loss)
    history = distill.align_partial_layers(
        teacher, student, kept, GROUPS, "both_neighbours", iter([fixed] * 12), config, steps=12
    )
    with torch.no_grad():
        end = float(distill.oda_loss(teacher, student, fixed, plan, config).loss)
    assert len(history) == 12 and history[0]["step"] == 1
    assert end < 0.7 * start


@pytest.mark.parametrize("quant_aware", ["off", "ste"])
def test_the_hidden_term_alone_lowers_the_hidden_nmse_at_every_gap(tiny_teacher, quant_aware):
    """alpha = 0, beta = 1 (once a crash: `element 0 of tensors does not require grad`)."""
    from fedsoda_cli.spec.schema import QuantizeSpec

    teacher, _ = tiny_teacher
    student, kept = pruned(teacher)
    config = AlignSpec(alpha=0.0, beta=1.0, lr=3e-3, quant_aware=quant_aware)
    heldout = token_windows(2, 16, 6)
    partial = distill.partial_layers("after_gap", kept, GROUPS)
    before = distill.measure(teacher, student, kept, GROUPS, heldout, config, QuantizeSpec(), partial)
    history = distill.align_partial_layers(
        teacher,
        student,
        kept,
        GROUPS,
        "after_gap",
        distill.seeded_batches(token_windows(8, 16, 7), 4, 0),
        config,
        steps=15,
        quant=QuantizeSpec(),
    )
    after = distill.measure(teacher, student, kept, GROUPS, heldout, config, QuantizeSpec(), partial)
    assert set(history[0]["hidden_nmse"]) == {"out3", "out5"}
    view = "deployed" if quant_aware == "ste" else "bf16"
    for gap, value in before[view]["hidden_nmse"].items():
        assert after[view]["hidden_nmse"][gap] < 0.9 * value, gap


def test_quant_aware_alignment_changes_only_the_partial_layers_and_lowers_the_deployed_kl(tiny_teacher):
    from fedsoda_cli.spec.schema import QuantizeSpec

    teacher, _ = tiny_teacher
    student, kept = pruned(teacher)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith(("model.layers.2.", "model.layers.3."))}
    config = AlignSpec(lr=3e-3, quant_aware="ste")
    heldout = token_windows(2, 16, 8)
    partial = distill.partial_layers("after_gap", kept, GROUPS)
    before = distill.measure(teacher, student, kept, GROUPS, heldout, config, QuantizeSpec(), partial)
    distill.align_partial_layers(
        teacher,
        student,
        kept,
        GROUPS,
        "after_gap",
        distill.seeded_batches(token_windows(8, 16, 9), 4, 0),
        config,
        steps=10,
        quant=QuantizeSpec(),
    )
    after = distill.measure(teacher, student, kept, GROUPS, heldout, config, QuantizeSpec(), partial)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in frozen.items())  # back to their float values
    assert after["deployed"]["kl"] < before["deployed"]["kl"]


def test_seeded_batches_repeat_and_cover_every_sequence():
    seqs = torch.arange(10).view(5, 2)
    first = [b["input_ids"] for _, b in zip(range(6), distill.seeded_batches(seqs, 2, seed=7))]
    again = [b["input_ids"] for _, b in zip(range(6), distill.seeded_batches(seqs, 2, seed=7))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    epoch = torch.cat(first[:3])
    assert sorted(epoch[:, 0].tolist()) == [0, 2, 4, 6, 8]


# ---- the stage -----------------------------------------------------------------------------------


def make_ctx(tmp_path, spec, prune_dir):
    from rich.console import Console

    from fedsoda_cli.pipeline import StageContext

    out = tmp_path / "out"
    out.mkdir()
    return StageContext(spec=spec, workdir=tmp_path, out=out, inputs={"prune": prune_dir}, console=Console(quiet=True))


def tiny_spec(**align):
    from fedsoda_cli.spec.schema import Spec

    return Spec.model_validate(
        {
            "model": {"name": "tiny-random-llama"},
            "public_data": {"sequences": 4, "seq_len": 24, "heldout_sequences": 2},
            "align": {"steps": 3, "batch_size": 2, "lr": 1e-3, **align},
        }
    )


def write_prune_output(folder, teacher, tokenizer, groups=GROUPS):
    student, kept = pruned(teacher, groups)
    save_checkpoint(student, tokenizer, folder / "model")
    (folder / "layer_map.json").write_text(
        json.dumps({"kept": kept, "removed_groups": groups, "num_layers": 6, "strategy": "sgp"})
    )
    return folder


def test_align_stage_writes_the_aligned_model_and_measurements(tmp_path, tiny_teacher):
    from fedsoda_cli.stages import align

    teacher, tokenizer = tiny_teacher
    prune_dir = write_prune_output(tmp_path / "prune", teacher, tokenizer)
    ctx = make_ctx(tmp_path, tiny_spec(), prune_dir)
    result = align.run(ctx)

    lines = (ctx.out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads((ctx.out / "layer_map.json").read_text())["kept"] == [0, 1, 3, 5]
    aligned, _ = load_checkpoint(ctx.out / "model")
    original, _ = load_checkpoint(prune_dir / "model")
    assert torch.equal(aligned.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(aligned.model.layers[2].mlp.up_proj.weight, original.model.layers[2].mlp.up_proj.weight)
    m = result.metrics
    assert m["partial_layers"] == [3, 5] and m["steps"] == 3
    assert set(m["before"]) >= {"kl", "hidden_nmse", "ppl_student", "ppl_teacher"}
    assert m["after"]["ppl_teacher"] == pytest.approx(m["before"]["ppl_teacher"])
    assert set(m["measured"]) == {"pruned_bf16", "aligned_bf16", "deployed_unaligned", "deployed_aligned"}
    assert all(set(v["hidden_nmse"]) == {"2", "4"} for v in m["measured"].values())
    assert m["quant_aware"] == "off" and m["hidden_at"] == "output"
    assert any(label.startswith("KL") for label, _ in result.summary)
    layer_map = json.loads((ctx.out / "layer_map.json").read_text())
    assert layer_map["partial_layers"] == [3, 5] and layer_map["bf16_layers"] == []


def test_align_text_task_prompts_trains_on_task_prompts_and_measures_on_the_same_heldout_text(tmp_path, tiny_teacher):
    from fedsoda_cli.stages import align

    teacher, tokenizer = tiny_teacher
    prune_dir = write_prune_output(tmp_path / "prune", teacher, tokenizer)
    results, models = {}, {}
    for text in ("public", "task_prompts"):
        (tmp_path / text).mkdir()
        ctx = make_ctx(tmp_path / text, tiny_spec(text=text), prune_dir)
        results[text] = align.run(ctx).metrics
        models[text] = load_checkpoint(ctx.out / "model")[0].model.layers[2].mlp.up_proj.weight
    # the same held-out windows before training, different training text after
    assert results["public"]["measured"]["pruned_bf16"] == results["task_prompts"]["measured"]["pruned_bf16"]
    assert not torch.equal(models["public"], models["task_prompts"])
    assert results["task_prompts"]["final_loss"] != results["public"]["final_loss"]


def test_a_measurement_that_got_worse_is_a_warning_row():
    from fedsoda_cli.stages import align

    good = {"kl": 0.5, "ppl_student": 10.0, "ppl_teacher": 5.0, "hidden_nmse": {"2": 0.3}}
    worse = {"kl": 0.6, "ppl_student": 9.0, "ppl_teacher": 5.0, "hidden_nmse": {"2": 0.4}}
    warnings = distill.regressions([("deployed", good, worse), ("bf16", good, good)])
    assert warnings == ["deployed KL 0.5000 -> 0.6000", "deployed hidden NMSE gap 2 0.3000 -> 0.4000"]
    measured = {"pruned_bf16": good, "aligned_bf16": good, "deployed_unaligned": good, "deployed_aligned": worse}
    rows = align.summary_rows(measured, [3], 2, AlignSpec(), warnings)
    assert rows[0][0] == "WARNING" and "deployed KL" in rows[0][1]
    assert align.summary_rows(measured, [3], 2, AlignSpec(), [])[0][0] != "WARNING"


def test_bf16_partial_layers_stay_bf16_in_the_client_model(tmp_path, tiny_teacher):
    from fedsoda_cli.models import quantized
    from fedsoda_cli.stages import align, quantize

    teacher, tokenizer = tiny_teacher
    prune_dir = write_prune_output(tmp_path / "prune", teacher, tokenizer)
    ctx = make_ctx(tmp_path, tiny_spec(quant_aware="bf16_partial", steps=1), prune_dir)
    align.run(ctx)
    assert json.loads((ctx.out / "layer_map.json").read_text())["bf16_layers"] == [3, 5]
    (tmp_path / "q").mkdir()
    from rich.console import Console

    from fedsoda_cli.pipeline import StageContext

    qctx = StageContext(
        spec=ctx.spec, workdir=tmp_path, out=tmp_path / "q", inputs={"align": ctx.out}, console=Console(quiet=True)
    )
    result = quantize.run(qctx)
    client, _ = quantized.load_client_model(tmp_path / "q" / "model", prepare_for_training=False)
    assert type(client.model.layers[2].mlp.up_proj) is torch.nn.Linear
    assert type(client.model.layers[1].mlp.up_proj) is not torch.nn.Linear
    assert result.metrics["bf16_layers"] == [3, 5]
    assert set(result.metrics["measured"]) == {"aligned_bf16", "deployed_aligned", "deployed_unaligned"}


def test_align_stage_rejects_a_partial_layer_that_was_pruned(tmp_path, tiny_teacher):
    from fedsoda_cli.stages import align

    teacher, tokenizer = tiny_teacher
    prune_dir = write_prune_output(tmp_path / "prune", teacher, tokenizer)
    with pytest.raises(SpecError, match=r"align\.partial"):
        align.run(make_ctx(tmp_path, tiny_spec(partial=[4]), prune_dir))


@pytest.mark.integration
def test_short_alignment_of_smollm2_lowers_heldout_kl():
    """SmolLM2 with 9 of 30 layers pruned (3 groups of 3): a few distillation steps on a few short
    WikiText-2 valid windows lower the KL on held-out test windows."""
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.public import public_sequences
    from fedsoda_cli.spec.schema import DataSpec

    teacher, tokenizer = load_causal_lm(ModelSpec(name="smollm2-135m"))
    groups = [[12, 13, 14], [18, 19, 20], [24, 25, 26]]
    student = copy.deepcopy(teacher)
    kept = drop_layers(student, [layer for g in groups for layer in g])
    data_dir = resolve_data_dir(DataSpec(), None)
    train = public_sequences(data_dir, "valid", tokenizer, 8, 64)
    heldout = public_sequences(data_dir, "test", tokenizer, 4, 64)
    config = AlignSpec(lr=2e-4, batch_size=4, logit_chunk=256)
    before = distill.evaluate_alignment(teacher, student, kept, groups, heldout, config)
    distill.align_partial_layers(
        teacher, student, kept, groups, "after_gap", distill.seeded_batches(train, 4, 0), config, steps=6
    )
    after = distill.evaluate_alignment(teacher, student, kept, groups, heldout, config)
    assert after["kl"] < before["kl"]
    assert after["ppl_student"] < before["ppl_student"]
